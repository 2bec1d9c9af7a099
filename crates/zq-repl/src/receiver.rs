//! The receiver engine: admits pinned senders, confines each to its destination root,
//! answers listings and retention requests, and dispatches steps (`receiver::step`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tracing::{debug, info, info_span, warn, Instrument};
use zq_net::{peer_fingerprint, Fingerprint, FramedRecv, FramedSend, StreamError};
use zq_proto::{
    Capabilities, DatasetSnapshots, ErrorKind, ListResponse, Message, Verdict, WireError,
};
use zq_store::{DatasetName, Zfs};

use crate::report::to_info;

mod lister;
pub mod spool;
mod step;

use crate::stripe::StepFrames;

/// How long a connected sender has to complete the zq handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a receiver that dialed waits for the sender's Hello (see
/// [`Receiver::serve_connection`]): longer than the sender's reconnection backoff.
pub const PULL_HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Which sender may write where: each sender key maps to one destination root.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    roots: HashMap<Fingerprint, DatasetName>,
    require_raw: bool,
    /// `zfs receive -o PROP=VALUE` on every receive (`zq-recv --force-property`).
    forced: Vec<(String, String)>,
    /// `zfs receive -x PROP` on every receive (`zq-recv --exclude-property`).
    excluded: Vec<String>,
}

impl Policy {
    /// Sets `prop` to `value` on every dataset this receiver receives (`zfs receive -o`),
    /// whatever the stream or the sender asks: e.g. `readonly=on` on a backup host. Checks
    /// the name and value as far as zq can; zfs judges the value when it receives.
    pub fn force_property(&mut self, prop: &str, value: &str) -> Result<(), String> {
        crate::props::check_name(prop)?;
        if crate::props::ENCRYPTION.contains(&prop) {
            return Err(format!(
                "{prop} cannot be forced: zfs takes no encryption property for raw streams, \
                 and a plain stream is encrypted as the destination's parent is"
            ));
        }
        crate::props::check_value(prop, value)?;
        if self.forced.iter().any(|(p, _)| p == prop) {
            return Err(format!("{prop} is forced twice"));
        }
        if self.excluded.iter().any(|p| p == prop) {
            return Err(format!("{prop} is both forced and excluded: choose one"));
        }
        self.forced.push((prop.to_string(), value.to_string()));
        Ok(())
    }

    /// Excludes `prop` from every receive (`zfs receive -x`): whatever a stream with
    /// properties carries, the received dataset inherits it here. (`mountpoint`,
    /// `canmount`, `sharenfs` and `sharesmb` are always excluded from such streams.)
    pub fn exclude_property(&mut self, prop: &str) -> Result<(), String> {
        crate::props::check_name(prop)?;
        if crate::props::ENCRYPTION.contains(&prop) {
            return Err(format!(
                "{prop} cannot be excluded: zfs refuses that for raw streams, and zq-recv \
                 never applies a source's key location (it sets keylocation=prompt)"
            ));
        }
        if self.forced.iter().any(|(p, _)| p == prop) {
            return Err(format!("{prop} is both forced and excluded: choose one"));
        }
        if !self.excluded.iter().any(|p| p == prop) {
            self.excluded.push(prop.to_string());
        }
        Ok(())
    }

    /// The properties excluded from every receive.
    pub fn excluded_properties(&self) -> &[String] {
        &self.excluded
    }

    /// The properties forced on every receive.
    pub fn forced_properties(&self) -> &[(String, String)] {
        &self.forced
    }

    /// Accept only raw sends of encrypted datasets (`zq-recv --require-encrypted`): this
    /// host never receives plaintext, and never holds a key of what it receives.
    pub fn require_raw(&mut self, on: bool) {
        self.require_raw = on;
    }

    /// Adds `fingerprint` with its root; a key may have only one root.
    pub fn allow(&mut self, fingerprint: Fingerprint, root: DatasetName) -> Result<(), String> {
        if let Some(old) = self.roots.get(&fingerprint) {
            return Err(format!(
                "sender {fingerprint} is already allowed into {old}; a sender has one root"
            ));
        }
        self.roots.insert(fingerprint, root);
        Ok(())
    }

    /// The keys that may connect.
    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        self.roots.keys().copied().collect()
    }

    /// The root of `fingerprint`.
    pub fn root(&self, fingerprint: &Fingerprint) -> Option<&DatasetName> {
        self.roots.get(fingerprint)
    }
}

/// Whether an `encryption` property value means encrypted.
pub(crate) fn is_encrypted(value: &str) -> bool {
    value != "off" && value != "-"
}

/// Checks that `name` is a valid dataset inside `root`.
pub fn authorize(root: &DatasetName, name: &str) -> Result<DatasetName, WireError> {
    let ds = DatasetName::parse(name)
        .map_err(|e| WireError::new(ErrorKind::InvalidName, e.to_string()))?;
    if !ds.is_within(root) {
        return Err(WireError::new(
            ErrorKind::NotAuthorized,
            format!("{ds} is outside this sender's destination root {root}"),
        ));
    }
    Ok(ds)
}

/// The receiving side, shared by all connections.
#[derive(Debug)]
pub struct Receiver {
    zfs: Zfs,
    policy: Policy,
    caps: Capabilities,
    /// One lock per target: steps into a target wait for each other, retention skips a
    /// target that is in use. It guards what this receiver knows of the target (see
    /// [`Known`]).
    targets: Mutex<HashMap<DatasetName, Arc<tokio::sync::Mutex<Option<Known>>>>>,
    /// Held around dataset-creating receives where concurrent mounts are unsafe (zfs-fuse).
    mounts: tokio::sync::Mutex<()>,
    /// The steps' target listings, batched.
    lister: Arc<lister::Lister>,
    /// Spooled steps, for resumes ([`spool`]).
    spools: spool::Spools,
    /// Last-received holds, moved in batches ([`crate::holds`]).
    holds: Arc<crate::holds::Holds>,
    /// Targets whose stale last-received holds this process has looked for (once each:
    /// only a restart can leave one behind).
    scanned: Mutex<std::collections::HashSet<DatasetName>>,
    /// Targets where an aborted full receive of this process left its new dataset behind
    /// (zfs did not discard it in time): the next full step replaces it, if it is still
    /// empty, rather than finding "a target that exists".
    abandoned: Mutex<std::collections::HashSet<DatasetName>>,
    /// Counters and open connections, for `--metrics-listen`.
    metrics: Arc<crate::metrics::ReceiverMetrics>,
    /// Stripe streams of bulk steps spread over parallel connections ([`crate::stripe`]).
    stripes: Arc<crate::stripe::StripeRegistry>,
}

/// A target's snapshots as this receiver left them after its last step: listed before the
/// step plus the snapshot it received. A step whose base is the newest of them skips its
/// listing (on zfs-fuse a listing costs ~1 ms per snapshot of the target, and it delayed
/// every small incremental). `zfs receive` itself still refuses a target that lacks the
/// base or whose data changed since it; when it does, the target is listed and the step
/// fails with the target's real state, as if it had been listed first. Anything else that
/// touches the target (retention, a failed step) forgets it, and a record older than
/// [`Known::TRUST`] is listed again.
#[derive(Debug, Clone)]
struct Known {
    snapshots: Vec<zq_proto::SnapshotInfo>,
    /// When a listing last confirmed the record.
    listed: std::time::Instant,
    /// Whether this receiver holds the newest snapshot with the sender's `last_tag`.
    held_last: bool,
}

impl Known {
    /// How long a record is used without listing the target again.
    const TRUST: std::time::Duration = std::time::Duration::from_secs(60);

    /// Whether an incremental from `from_guid` may skip the listing.
    fn base_is_newest(&self, from_guid: u64) -> bool {
        self.listed.elapsed() < Self::TRUST
            && self.snapshots.last().is_some_and(|s| s.guid == from_guid)
    }
}

/// What a connection's handshake agreed on.
#[derive(Debug, Clone, Copy)]
struct Agreed {
    version: u16,
    /// Both sides offered the `spool` resume kind.
    spooling: bool,
    /// Both sides offered the `zfs-token` resume kind: `zfs receive -s` where the pool
    /// can, and no spool there.
    native: bool,
    /// The sender may compress chunks with zstd.
    zstd: bool,
    /// How `StepEnd` hashes the whole stream.
    digest: zq_proto::StreamDigest,
}

/// What a step does with its target's partial receive, if it has one
/// ([`zq_proto::StepBegin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Partial {
    /// The step is `zfs send -t` of this token: the target's must be the same.
    Resume(String),
    /// Discard it (`zfs receive -A`) first.
    Discard,
    /// The sender did not say (before version 7, or it did not see one): a partial receive
    /// of this very step is kept (the sender is told to list again and resume it), one of
    /// another step is discarded.
    Keep,
}

/// The receiver's last-received hold a step asks for ([`zq_proto::StepStart`]).
#[derive(Debug, Clone, Default)]
struct LastHold {
    /// `zq_<job>_last`, or empty (no job: a version 2 sender).
    tag: String,
    /// Move the tag to the received snapshot; otherwise remove it where this receiver
    /// placed it.
    hold: bool,
}

/// What a step asks of the receiver besides its data: the hold to move, and its
/// properties (version 8).
#[derive(Debug, Clone, Default)]
struct Asks {
    last: LastHold,
    properties: zq_proto::StepProperties,
}

/// How long retention waits for a step on the same target before skipping it this time.
const PRUNE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a step waits for another step or retention pass on the same target.
const TARGET_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Receiver {
    /// A receiver with this policy that spools nothing: interrupted steps restart.
    pub fn new(zfs: Zfs, policy: Policy, caps: Capabilities) -> Arc<Self> {
        Self::with_spools(zfs, policy, caps, spool::Spools::disabled())
    }

    /// A receiver that spools large steps so that they can resume ([`spool`]); it offers
    /// the `spool` resume kind only if `spools` is enabled.
    pub fn with_spools(
        zfs: Zfs,
        policy: Policy,
        mut caps: Capabilities,
        spools: spool::Spools,
    ) -> Arc<Self> {
        if !spools.enabled() {
            caps.resume.retain(|r| r != zq_proto::RESUME_SPOOL);
        }
        if !zfs.capabilities().resumable_receive {
            caps.resume.retain(|r| r != zq_proto::RESUME_ZFS_TOKEN);
        }
        Arc::new(Receiver {
            lister: lister::Lister::new(zfs.clone()),
            holds: crate::holds::Holds::new(zfs.clone()),
            zfs,
            policy,
            caps,
            targets: Mutex::new(HashMap::new()),
            mounts: tokio::sync::Mutex::new(()),
            spools,
            scanned: Mutex::new(Default::default()),
            abandoned: Mutex::new(Default::default()),
            metrics: Arc::default(),
            stripes: Arc::default(),
        })
    }

    /// What `--metrics-listen` serves.
    pub fn metrics(&self) -> Arc<crate::metrics::ReceiverMetrics> {
        self.metrics.clone()
    }

    /// Waits (at most 15 s) for the last-received holds asked for so far: call it before
    /// exiting.
    pub async fn flush_holds(&self) {
        self.holds.flush(std::time::Duration::from_secs(15)).await;
    }

    fn target_lock(
        &self,
        target: &DatasetName,
    ) -> Result<Arc<tokio::sync::Mutex<Option<Known>>>, WireError> {
        let mut targets = self.targets.lock().map_err(|_| internal("lock poisoned"))?;
        Ok(targets.entry(target.clone()).or_default().clone())
    }

    /// Accepts connections on `endpoint` until it is closed.
    ///
    /// A sender resuming a TLS session sends its Hello in 0-RTT; it is answered at once
    /// (0.5-RTT), so a reconnect costs one round trip. The sender's key is then known from
    /// the resumed session. A Hello is safe to answer twice, and it is the only request
    /// served before the handshake completes: an attacker replaying 0-RTT packets gets no
    /// further.
    ///
    /// `admission` decides which new clients must first prove their address (a QUIC
    /// Retry, see [`zq_net::admission`]).
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint, admission: zq_net::Admission) {
        while let Some(incoming) = endpoint.accept().await {
            let Some((incoming, handshaking)) = admission.admit(incoming) else {
                continue;
            };
            let this = self.clone();
            let remote = incoming.remote_address();
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    warn!(%remote, error = %e, "cannot accept connection");
                    continue;
                }
            };
            tokio::spawn(async move {
                // Always Ok on a server; fall back to the full handshake all the same.
                let (conn, established) = match connecting.into_0rtt() {
                    Ok((conn, accepted)) => (conn, Some(accepted)),
                    Err(connecting) => match connecting.await {
                        Ok(conn) => (conn, None),
                        Err(e) => {
                            warn!(%remote, error = %e, "connection refused or failed during handshake");
                            return;
                        }
                    },
                };
                this.connection(conn, established, HANDSHAKE_TIMEOUT, Some(handshaking))
                    .instrument(info_span!("conn", %remote))
                    .await
            });
        }
    }

    /// Serves one connection this receiver dialed (pull mode, `zq-recv pull`): the sender
    /// at the other end drives it as usual, under the same policy. Returns when it closes.
    /// The sender may take a while to start (it picks the connection up between its
    /// reconnection attempts), so its Hello may come up to [`PULL_HELLO_TIMEOUT`] later.
    pub async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        self.connection(conn, None, PULL_HELLO_TIMEOUT, None)
            .instrument(info_span!("conn", %remote))
            .await
    }

    async fn connection(
        self: Arc<Self>,
        conn: quinn::Connection,
        mut established: Option<quinn::ZeroRttAccepted>,
        hello_timeout: std::time::Duration,
        // Counts this connection's handshake for admission until the TLS handshake ends.
        handshaking: Option<zq_net::admission::Handshaking>,
    ) {
        // Known before the handshake completes only when the session is resumed.
        if peer_fingerprint(&conn).is_none() && !Self::established(&conn, &mut established).await {
            return;
        }
        let Some(fp) = peer_fingerprint(&conn) else {
            warn!("connected sender has no key; closing");
            conn.close(1u32.into(), b"unknown sender key");
            return;
        };
        let Some(root) = self.policy.root(&fp).cloned() else {
            warn!(sender = %fp, "connected key has no root; closing");
            conn.close(1u32.into(), b"unknown sender key");
            return;
        };
        info!(sender = %fp.short(), root = %root, "sender connected");
        let sender = fp.short().to_string();
        let _listed = self
            .metrics
            .connected(sender, conn.remote_address(), conn.clone());
        let handshake = tokio::time::timeout(hello_timeout, self.handshake(&conn));
        let result = handshake
            .await
            .unwrap_or_else(|_| Err(format!("no Hello within {hello_timeout:?}")));
        let agreed = match result {
            Ok(w) => Agreed {
                version: w.version,
                spooling: w.resume.iter().any(|r| r == zq_proto::RESUME_SPOOL),
                native: w.version >= 7 && w.resume.iter().any(|r| r == zq_proto::RESUME_ZFS_TOKEN),
                zstd: w.compression == zq_proto::COMPRESSION_ZSTD,
                digest: zq_proto::StreamDigest::from_checksum(&w.checksum)
                    .unwrap_or(zq_proto::StreamDigest::Flat),
            },
            Err(e) => {
                warn!(error = %e, "handshake failed");
                conn.close(2u32.into(), b"handshake failed");
                return;
            }
        };
        // Nothing but the Hello is served from 0-RTT data.
        if !Self::established(&conn, &mut established).await {
            return;
        }
        drop(handshaking);
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    info!(reason = %e, "connection closed");
                    return;
                }
            };
            let this = self.clone();
            let root = root.clone();
            tokio::spawn(
                async move {
                    let (mut send, recv) = (FramedSend::new(send), FramedRecv::new(recv));
                    if let Err(e) = this.stream(&root, fp, agreed, &mut send, recv).await {
                        warn!(error = %e, "stream failed");
                    }
                }
                // Keep the connection's span (remote address) on every request's logs.
                .instrument(tracing::Span::current()),
            );
        }
    }

    /// Waits for the TLS handshake to complete (once); false if it failed.
    async fn established(
        conn: &quinn::Connection,
        established: &mut Option<quinn::ZeroRttAccepted>,
    ) -> bool {
        if let Some(accepted) = established.take() {
            if tokio::time::timeout(HANDSHAKE_TIMEOUT, accepted)
                .await
                .is_err()
            {
                warn!("handshake did not complete within {HANDSHAKE_TIMEOUT:?}");
                conn.close(2u32.into(), b"handshake timeout");
                return false;
            }
        }
        match conn.close_reason() {
            None => true,
            Some(e) => {
                warn!(error = %e, "connection refused or failed during handshake");
                false
            }
        }
    }

    /// Answers the Hello; returns what was agreed.
    async fn handshake(&self, conn: &quinn::Connection) -> Result<zq_proto::Welcome, String> {
        let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
        let reply = match recv.message("Hello").await {
            Ok(Message::Hello(h)) => {
                info!(peer = %h.software, versions = ?(h.min_version, h.max_version), "hello");
                self.caps.accept(&h).map_err(|r| (r.message.clone(), r))
            }
            Ok(other) => Err(self.bad_hello(format!("first message was {}", other.name()))),
            Err(e) => Err(self.bad_hello(e.to_string())),
        };
        let (msg, result) = match reply {
            Ok(w) => {
                info!(version = w.version, resume = ?w.resume, "handshake complete");
                (Message::Welcome(w.clone()), Ok(w))
            }
            Err((why, r)) => (Message::Refused(r), Err(why)),
        };
        send.send(&msg).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        // Let the refusal reach the sender before the connection closes.
        if result.is_err() {
            send.stopped().await;
        }
        result
    }

    fn bad_hello(&self, why: String) -> (String, zq_proto::Refusal) {
        let r = zq_proto::Refusal {
            reason: zq_proto::RefusalReason::BadHello,
            min_version: self.caps.min_version,
            max_version: self.caps.max_version,
            message: format!("expected a zq Hello: {why}"),
        };
        (r.message.clone(), r)
    }

    /// Serves one request stream. When the session agreed on the `spool` resume kind, a
    /// listing is followed by the resumable steps under the listed roots, and a step may
    /// resume one.
    async fn stream(
        &self,
        root: &DatasetName,
        peer: Fingerprint,
        agreed: Agreed,
        send: &mut FramedSend,
        mut recv: FramedRecv,
    ) -> Result<(), StreamError> {
        // Steps may spread their chunks over stripe streams from version 5.
        let stripes = (agreed.version >= 5).then(|| (self.stripes.clone(), peer));
        let reply = match recv.message("a request").await {
            Ok(Message::StripeJoin(j)) if agreed.version >= 5 => {
                // Read by the step that claims it; nothing is answered here (the sender
                // does not read this side).
                let _ = send.finish();
                return match self.stripes.deliver(peer, j, recv) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        warn!(error = %e, "stripe stream refused");
                        Ok(())
                    }
                };
            }
            Ok(m @ (Message::ListRequest(_) | Message::ListNewest(_)))
                if agreed.version >= 9 || matches!(m, Message::ListRequest(_)) =>
            {
                let (r, newest) = match m {
                    Message::ListNewest(r) => (r, true),
                    Message::ListRequest(r) => (r, false),
                    _ => unreachable!("matched above"),
                };
                let roots = r.roots.clone();
                // The pools' features (for Destination) are read while zfs lists.
                let (listing, _) = tokio::join!(self.list(root, r, newest), async {
                    if agreed.version >= 6 {
                        self.read_features(root, &roots).await;
                    }
                });
                match listing {
                    Ok((l, encrypted, partial)) => {
                        let listed: Vec<String> =
                            l.datasets.iter().map(|d| d.name.clone()).collect();
                        // ListResponse, then what each version adds; the last is the reply.
                        let mut answers = vec![Message::ListResponse(l)];
                        if agreed.spooling {
                            let mut tokens = Vec::new();
                            for r in &roots {
                                // Authorized by the listing.
                                if let Ok(ds) = DatasetName::parse(&r.dataset) {
                                    tokens
                                        .extend(self.spools.tokens_under(&ds, r.recursive).await);
                                }
                            }
                            answers.push(Message::Resumable(zq_proto::Resumable { tokens }));
                        }
                        if agreed.version >= 6 {
                            answers.push(match self.destination(&roots, &listed, encrypted).await {
                                Ok(d) => Message::Destination(d),
                                Err(e) => Message::Error(e),
                            });
                        }
                        if agreed.version >= 7 {
                            answers.push(Message::PartialReceives(zq_proto::PartialReceives {
                                partial,
                            }));
                        }
                        let last = answers.pop();
                        for a in answers {
                            let error = matches!(a, Message::Error(_));
                            send.send(&a).await?;
                            if error {
                                send.finish()?;
                                return Ok(());
                            }
                        }
                        last.unwrap_or_else(|| Message::Error(internal("no listing")))
                    }
                    Err(e) => Message::Error(e),
                }
            }
            Ok(Message::Prune(p)) => {
                let by = zq_proto::PruneBy {
                    dataset: p.dataset,
                    keep_last: Some(p.keep_last),
                    grid: None,
                    base_guid: p.base_guid,
                    dry_run: false,
                };
                match self.prune(root, by).await {
                    Ok(pruned) => Message::Pruned(pruned),
                    Err(e) => Message::Error(e),
                }
            }
            Ok(Message::PruneBy(p)) if agreed.version >= 4 => match self.prune(root, p).await {
                Ok(pruned) => Message::Pruned(pruned),
                Err(e) => Message::Error(e),
            },
            Ok(Message::StepStart(s)) if agreed.version >= 3 => {
                let span = info_span!("step", target = %s.header.target, to = %s.header.to.name);
                let mut frames = StepFrames::new(&mut recv, stripes);
                let v = self
                    .step_start(root, s, Partial::Keep, Default::default(), agreed, &mut frames)
                    .instrument(span)
                    .await;
                Message::Verdict(v)
            }
            Ok(Message::StepBegin(b)) if agreed.version >= 7 => {
                let mut frames = StepFrames::new(&mut recv, stripes);
                let v = self
                    .step_begin(root, *b, Default::default(), agreed, &mut frames)
                    .await;
                Message::Verdict(v)
            }
            Ok(Message::StepWith(w)) if agreed.version >= 8 => {
                let mut frames = StepFrames::new(&mut recv, stripes);
                let w = *w;
                let v = self
                    .step_begin(root, w.begin, w.properties, agreed, &mut frames)
                    .await;
                Message::Verdict(v)
            }
            Ok(Message::StepHeader(h)) => {
                let span = info_span!("step", target = %h.target, to = %h.to.name);
                let mut frames = StepFrames::new(&mut recv, None);
                let v = self
                    .step(
                        root,
                        h,
                        None,
                        Asks::default(),
                        Partial::Keep,
                        agreed,
                        &mut frames,
                    )
                    .instrument(span)
                    .await;
                Message::Verdict(v)
            }
            Ok(other) => Message::Error(WireError::new(
                ErrorKind::Protocol,
                format!(
                    "a stream must start with ListRequest, Prune, StepHeader or (from version 3) StepStart, not {}",
                    other.name()
                ),
            )),
            Err(e) => Message::Error(WireError::new(ErrorKind::Protocol, e.to_string())),
        };
        if let Message::Verdict(Verdict::Failed(e)) | Message::Error(e) = &reply {
            warn!(kind = ?e.kind, error = %e.message, "request failed");
            recv.stop();
        }
        send.send(&reply).await?;
        send.finish()?;
        Ok(())
    }

    /// The listing, the names of the listed datasets that are encrypted, and the partial
    /// receives under the roots (none that a step of ours is receiving into: that state is
    /// in flux, and the step's end settles it). With `newest`, each dataset's snapshots may
    /// be its newest only ([`Zfs::list_newest`]), where zfs can tell it cheaply.
    async fn list(
        &self,
        root: &DatasetName,
        req: zq_proto::ListRequest,
        newest: bool,
    ) -> Result<
        (
            ListResponse,
            Vec<DatasetName>,
            Vec<zq_proto::PartialReceive>,
        ),
        WireError,
    > {
        let mut datasets = Vec::new();
        let mut encrypted = Vec::new();
        let mut partial = Vec::new();
        for r in req.roots {
            let ds = authorize(root, &r.dataset)?;
            let zfs_err = |e: zq_store::StoreError| WireError::new(ErrorKind::Zfs, e.to_string());
            let short = match newest {
                true => self
                    .zfs
                    .list_newest(&ds, r.recursive)
                    .await
                    .map_err(zfs_err)?,
                false => None,
            };
            let tree = match short {
                Some(tree) => tree,
                None => self.zfs.list(&ds, r.recursive).await.map_err(zfs_err)?,
            };
            // A dataset without snapshots may be a full stream in flight (OpenZFS lists it
            // while it is received): one of our steps, or a receive zfs marks
            // inconsistent (one zfs get for all such datasets of the tree). Left out, the
            // sender plans the full step again, which waits for ours to end or is told a
            // receive is in progress, instead of calling it a destination with nothing in
            // common.
            let empty: Vec<DatasetName> = tree
                .iter()
                .filter(|d| d.snapshots.is_empty())
                .map(|d| d.name.clone())
                .collect();
            // A zfs that cannot tell (an older release without the property) must not
            // fail the listing: those datasets are listed as they are.
            let foreign = self
                .zfs
                .being_received_of(&empty)
                .await
                .unwrap_or_else(|e| {
                    debug!(error = %e, "cannot ask zfs which datasets are being received");
                    Vec::new()
                });
            encrypted.extend(
                tree.iter()
                    .filter(|d| d.encryption.as_deref().is_some_and(is_encrypted))
                    .map(|d| d.name.clone()),
            );
            partial.extend(tree.iter().filter_map(|d| {
                let token = d.resume_token.as_ref()?;
                (token.len() <= zq_proto::limits::MAX_RESUME_TOKEN_LEN
                    && !self.receiving_into(&d.name))
                .then(|| zq_proto::PartialReceive {
                    dataset: d.name.to_string(),
                    token: token.clone(),
                })
            }));
            datasets.extend(
                tree.into_iter()
                    .filter(|d| {
                        !(d.snapshots.is_empty()
                            && (self.receiving_into(&d.name) || foreign.contains(&d.name)))
                    })
                    .map(|d| DatasetSnapshots {
                        name: d.name.to_string(),
                        snapshots: d.snapshots.iter().map(to_info).collect(),
                    }),
            );
        }
        Ok((ListResponse { datasets }, encrypted, partial))
    }

    /// Reads (into the cache of [`Zfs::pool_features`]) the features of the pools of
    /// `roots` inside the sender's `root`; failures are left for [`Self::destination`].
    async fn read_features(&self, root: &DatasetName, roots: &[zq_proto::ListRoot]) {
        for r in roots {
            if let Ok(ds) = authorize(root, &r.dataset) {
                let _ = self.zfs.pool_features(ds.pool()).await;
            }
        }
    }

    /// What the destination of a listing of `roots` (authorized by it) can receive: the
    /// features of their pools (those all of them have), the encrypted datasets (and the
    /// encrypted nearest ancestor of a root that does not exist), and this receiver's rule
    /// on raw streams. Features are read at most once a minute per pool.
    async fn destination(
        &self,
        roots: &[zq_proto::ListRoot],
        listed: &[String],
        mut encrypted: Vec<DatasetName>,
    ) -> Result<zq_proto::Destination, WireError> {
        let zfs_err = |e: zq_store::StoreError| WireError::new(ErrorKind::Zfs, e.to_string());
        let mut features: Option<std::collections::BTreeSet<String>> = None;
        for r in roots {
            let ds = DatasetName::parse(&r.dataset)
                .map_err(|e| WireError::new(ErrorKind::InvalidName, e.to_string()))?;
            let f = self.zfs.pool_features(ds.pool()).await.map_err(zfs_err)?;
            features = Some(match features {
                None => f.enabled,
                Some(had) => had.intersection(&f.enabled).cloned().collect(),
            });
            // A root that exists was listed with its encryption: no zfs call for it.
            if !listed.contains(&r.dataset) {
                if let Some((at, enc, _)) =
                    self.zfs.inherited_encryption(&ds).await.map_err(zfs_err)?
                {
                    if is_encrypted(&enc) && !encrypted.contains(&at) {
                        encrypted.push(at);
                    }
                }
            }
        }
        Ok(zq_proto::Destination {
            features: features.unwrap_or_default().into_iter().collect(),
            require_raw: self.policy.require_raw,
            encrypted: encrypted.iter().map(ToString::to_string).collect(),
        })
    }

    /// A step that starts with `StepBegin` (version 7), or `StepWith` (version 8: with
    /// `properties`).
    async fn step_begin(
        &self,
        root: &DatasetName,
        b: zq_proto::StepBegin,
        properties: zq_proto::StepProperties,
        agreed: Agreed,
        frames: &mut StepFrames<'_>,
    ) -> Verdict {
        let span =
            info_span!("step", target = %b.start.header.target, to = %b.start.header.to.name);
        let partial = match (b.resume_token, b.discard_partial) {
            (Some(t), _) => Partial::Resume(t),
            (None, true) => Partial::Discard,
            (None, false) => Partial::Keep,
        };
        if matches!(partial, Partial::Resume(_)) && !agreed.native {
            return Verdict::Failed(WireError::new(
                ErrorKind::Protocol,
                "a step resumed with zfs send -t, but the session did not agree on zfs-token",
            ));
        }
        self.step_start(root, b.start, partial, properties, agreed, frames)
            .instrument(span)
            .await
    }

    /// A step that starts with `StepStart` (or, from version 7, `StepBegin`).
    async fn step_start(
        &self,
        root: &DatasetName,
        s: zq_proto::StepStart,
        partial: Partial,
        properties: zq_proto::StepProperties,
        agreed: Agreed,
        frames: &mut StepFrames<'_>,
    ) -> Verdict {
        if s.resume.is_some() && !agreed.spooling {
            return Verdict::Failed(WireError::new(
                ErrorKind::Protocol,
                "a resumed step, but the session did not agree on spooling",
            ));
        }
        if !s.last_tag.is_empty() && !crate::protect::Tags::is_last_tag(&s.last_tag) {
            return Verdict::Failed(WireError::new(
                ErrorKind::InvalidName,
                format!("{:?} is not a zq hold tag (zq_<job>_last)", s.last_tag),
            ));
        }
        let asks = Asks {
            last: LastHold {
                tag: s.last_tag,
                hold: s.hold_last,
            },
            properties,
        };
        self.step(root, s.header, s.resume, asks, partial, agreed, frames)
            .await
    }

    /// Whether a step is receiving into `target` now (it holds the target's lock).
    fn receiving_into(&self, target: &DatasetName) -> bool {
        let Ok(targets) = self.targets.lock() else {
            return false;
        };
        targets
            .get(target)
            .is_some_and(|lock| lock.try_lock().is_err())
    }

    /// Retention of one target's `zq_` snapshots (see [`crate::retention`]). Skipped while a
    /// step into the target runs; the next request catches up.
    async fn prune(
        &self,
        root: &DatasetName,
        req: zq_proto::PruneBy,
    ) -> Result<zq_proto::Pruned, WireError> {
        let target = authorize(root, &req.dataset)?;
        let policy = crate::retention::Policy {
            keep_last: req
                .keep_last
                .map(|k| usize::try_from(k).unwrap_or(usize::MAX)),
            grid: req
                .grid
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|e: String| {
                    WireError::new(ErrorKind::Protocol, format!("PruneBy.grid {e}"))
                })?,
        };
        let lock = self.target_lock(&target)?;
        let Ok(mut known) = tokio::time::timeout(PRUNE_WAIT, lock.lock_owned()).await else {
            return Ok(zq_proto::Pruned {
                destroyed: Vec::new(),
                remaining: None,
            });
        };
        // The next step lists the target afresh.
        *known = None;
        let state = self.zfs.list(&target, false).await.map_err(zfs_err)?;
        let Some(state) = state.first() else {
            return Ok(zq_proto::Pruned {
                destroyed: Vec::new(),
                remaining: Some(0),
            });
        };
        let snapshots: Vec<_> = state.snapshots.iter().map(to_info).collect();
        let mut destroyed = Vec::new();
        let doomed = crate::retention::prunable_by(
            &snapshots,
            crate::retention::ZQ_PREFIX,
            &policy,
            req.base_guid,
            std::time::SystemTime::now(),
        );
        if req.dry_run {
            // What would really go: held snapshots stay (zfs refuses to destroy them).
            let names: Vec<&str> = doomed.iter().map(|s| s.name.as_str()).collect();
            let would: Vec<String> = self
                .zfs
                .unheld(&target, &names)
                .await
                .map_err(zfs_err)?
                .into_iter()
                .map(str::to_owned)
                .collect();
            let zq = snapshots
                .iter()
                .filter(|s| s.name.starts_with(crate::retention::ZQ_PREFIX))
                .count();
            return Ok(zq_proto::Pruned {
                remaining: Some(u32::try_from(zq.saturating_sub(would.len())).unwrap_or(u32::MAX)),
                destroyed: would,
            });
        }
        for s in doomed {
            let snap = target
                .snapshot(&s.name)
                .map_err(|e| internal(e.to_string()))?;

            match self.zfs.destroy_snapshot(&snap).await {
                Ok(()) => destroyed.push(s.name.clone()),
                // Held (by zq's other jobs, or anyone): never destroyed.
                Err(e) if e.stderr().is_some_and(|m| m.contains("dataset is busy")) => {
                    debug!(%snap, "held; not pruned");
                }
                Err(e) => return Err(zfs_err(e)),
            }
        }
        if !destroyed.is_empty() {
            debug!(%target, count = destroyed.len(), "pruned");
        }
        let zq = snapshots
            .iter()
            .filter(|s| s.name.starts_with(crate::retention::ZQ_PREFIX))
            .count();
        let remaining = u32::try_from(zq.saturating_sub(destroyed.len())).unwrap_or(u32::MAX);
        Ok(zq_proto::Pruned {
            destroyed,
            remaining: Some(remaining),
        })
    }
}

fn zfs_err(e: zq_store::StoreError) -> WireError {
    let mut msg = e.to_string();
    if msg.contains("has been modified") {
        msg.push_str(
            " (hint: the replica was changed since its last snapshot, and even reading files \
             updates atime; set atime=off or readonly=on on the destination root, or use \
             --force to roll the changes back)",
        );
    }
    WireError::new(ErrorKind::Zfs, msg)
}

fn internal(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorKind::Internal, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("backup/a", true)]
    #[case("backup/a/home/x", true)]
    #[case("backup/ab", false)]
    #[case("backup", false)]
    #[case("other/a", false)]
    #[case("backup/a/../b", false)]
    #[case("/backup/a", false)]
    #[case("-backup/a", false)]
    #[case("backup/a/x y", false)]
    #[case("backup/a/x;reboot", false)]
    fn authorization(#[case] target: &str, #[case] ok: bool) {
        let root = DatasetName::parse("backup/a").unwrap();
        assert_eq!(authorize(&root, target).is_ok(), ok, "{target}");
    }

    #[test]
    fn one_root_per_sender() {
        let mut p = Policy::default();
        let fp = Fingerprint::parse(&"ab".repeat(32)).unwrap();
        p.allow(fp, DatasetName::parse("b/a").unwrap()).unwrap();
        assert!(p.allow(fp, DatasetName::parse("b/c").unwrap()).is_err());
    }

    #[rstest]
    #[case("readonly", "on", true)]
    #[case("com.example:backup", "yes please", true)]
    #[case("atime", "off", true)]
    #[case("Readonly", "on", false)]
    #[case("", "on", false)]
    #[case("read only", "on", false)]
    #[case("-o", "on", false)]
    #[case("readonly", "", false)]
    #[case("readonly", "on\n-x", false)]
    #[case("keylocation", "prompt", false)]
    #[case("encryption", "off", false)]
    fn forced_properties_are_checked(#[case] prop: &str, #[case] value: &str, #[case] ok: bool) {
        let mut p = Policy::default();
        assert_eq!(p.force_property(prop, value).is_ok(), ok, "{prop}={value}");
        assert_eq!(p.forced_properties().len(), usize::from(ok));
    }

    #[test]
    fn a_property_is_forced_once() {
        let mut p = Policy::default();
        p.force_property("readonly", "on").unwrap();
        assert!(p.force_property("readonly", "off").is_err());
        assert_eq!(p.forced_properties(), [("readonly".into(), "on".into())]);
    }
}
