//! Every message zq peers exchange, and the size checks applied to each after decoding.
//!
//! Messages travel bincode-encoded (bincode 2.0.1, standard configuration) inside
//! [`Frame::Message`](crate::Frame). The variant order of [`Message`] is part of the wire
//! format: new variants are appended and bump the protocol version. `Hello`, `Welcome` and
//! `Refused` are frozen forever so that any two versions can at least tell each other apart.

use serde::{Deserialize, Serialize};

use crate::limits::*;

/// One protocol message. The comment on each variant says which side sends it and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Sender → receiver, first frame of the handshake stream. Frozen layout.
    Hello(Hello),
    /// Receiver → sender: the handshake succeeded with these parameters. Frozen layout.
    Welcome(Welcome),
    /// Receiver → sender: the handshake failed; the connection will be closed. Frozen layout.
    Refused(Refusal),
    /// Sender → receiver, first frame of a listing stream.
    ListRequest(ListRequest),
    /// Receiver → sender, the answer to a [`ListRequest`].
    ListResponse(ListResponse),
    /// Sender → receiver, first frame of a step stream; data chunks follow.
    StepHeader(StepHeader),
    /// Sender → receiver, after the last data chunk of a step.
    StepEnd(StepEnd),
    /// Sender → receiver, instead of [`StepEnd`] when the sending side failed mid-stream.
    StepAbort(StepAbort),
    /// Receiver → sender, the outcome of a step.
    Verdict(Verdict),
    /// Either way: a request on this stream failed before it could be answered.
    Error(WireError),
    /// Sender → receiver: apply retention to the `zq_` snapshots of one target.
    Prune(PruneRequest),
    /// Receiver → sender, the answer to a [`PruneRequest`].
    Pruned(Pruned),
    /// Receiver → sender, after a [`ListResponse`] when the session agreed on
    /// [`RESUME_SPOOL`]: the interrupted steps it can resume under the listed roots.
    Resumable(Resumable),
    /// Sender → receiver, first frame of a step from version 3, instead of [`StepHeader`]:
    /// the header with the step's protection and, with [`RESUME_SPOOL`], where a resumed
    /// step's data continue. Data chunks follow.
    StepStart(StepStart),
    /// Sender → receiver, from version 4, instead of [`Message::Prune`]: retention by count
    /// and/or a time grid, or only what it would destroy. Answered by [`Pruned`].
    PruneBy(PruneBy),
    /// Sender → receiver, from version 5, on a step stream between its data chunks: the
    /// rest of the step's chunks come on [`Stripes::count`] stripe streams, possibly on
    /// other connections of the same sender. [`StepEnd`] (or [`StepAbort`]) follows here
    /// once the last chunk is queued; the receiver applies `StepEnd` only after every
    /// stripe stream has ended (streams are not ordered with each other).
    Stripes(Stripes),
    /// Sender → receiver, from version 5: the first frame of a stripe stream.
    StripeJoin(StripeJoin),
    /// Sender → receiver, from version 5, on a stripe stream: the next frame is data chunk
    /// number `.0` of the striped part of the step (counted from 0).
    StripeChunk(u64),
    /// Receiver → sender, from version 6, the last answer to a [`ListRequest`] (after
    /// [`ListResponse`] and any [`Resumable`]) until version 7: what the destination can
    /// receive, so that the sender picks `zfs send` options from facts.
    Destination(Destination),
    /// Receiver → sender, from version 7, the last answer to a [`ListRequest`] (after
    /// [`Destination`]): the targets under the roots that an interrupted `zfs receive -s`
    /// left partial, with their `receive_resume_token`.
    PartialReceives(PartialReceives),
    /// Sender → receiver, first frame of a step from version 7, instead of [`StepStart`]:
    /// the step, and whether it continues the target's partial receive (`zfs send -t`) or
    /// discards it first (`zfs receive -A`). Boxed: the largest message, and frames hold
    /// data chunks far more often (encoded as the struct itself).
    StepBegin(Box<StepBegin>),
    /// Sender → receiver, first frame of a step from version 8 when the step has
    /// properties to carry or ask for, instead of [`StepBegin`]. Boxed like it.
    StepWith(Box<StepWith>),
    /// Sender → receiver, first frame of a listing stream from version 9, instead of
    /// [`ListRequest`] when the sender needs only each dataset's newest snapshot (a one-shot
    /// run's plan, which lists in full when that is not a common snapshot). Answered as a
    /// `ListRequest` is, but each dataset's snapshots may be just its newest: where zfs
    /// names it without reading the others, the answer costs nothing per snapshot.
    ListNewest(ListRequest),
}

/// The compression name of chunks sent as they are: always understood.
pub const COMPRESSION_NONE: &str = "none";

/// The compression name of zstd-compressed chunks.
pub const COMPRESSION_ZSTD: &str = "zstd";

/// The resume kind in which the receiver spools a large step's verified bytes and the
/// sender continues from where they end (see `docs/protocol.md`).
pub const RESUME_SPOOL: &str = "spool";

/// The resume kind in which the receiver runs `zfs receive -s` and the sender continues an
/// interrupted step with `zfs send -t` (OpenZFS; protocol version 7).
pub const RESUME_ZFS_TOKEN: &str = "zfs-token";

impl Message {
    /// Short name of the variant, for error messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Refused(_) => "Refused",
            Message::ListRequest(_) => "ListRequest",
            Message::ListResponse(_) => "ListResponse",
            Message::StepHeader(_) => "StepHeader",
            Message::StepEnd(_) => "StepEnd",
            Message::StepAbort(_) => "StepAbort",
            Message::Verdict(_) => "Verdict",
            Message::Error(_) => "Error",
            Message::Prune(_) => "Prune",
            Message::Pruned(_) => "Pruned",
            Message::Resumable(_) => "Resumable",
            Message::StepStart(_) => "StepStart",
            Message::PruneBy(_) => "PruneBy",
            Message::Stripes(_) => "Stripes",
            Message::StripeJoin(_) => "StripeJoin",
            Message::StripeChunk(_) => "StripeChunk",
            Message::Destination(_) => "Destination",
            Message::PartialReceives(_) => "PartialReceives",
            Message::StepBegin(_) => "StepBegin",
            Message::StepWith(_) => "StepWith",
            Message::ListNewest(_) => "ListNewest",
        }
    }

    /// Checks every variable-length field against the limits in [`crate::limits`].
    /// The decoder calls this on every message; a peer's message is hostile until it passes.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            Message::Hello(h) => {
                check_text("Hello.software", &h.software)?;
                for (field, caps) in [
                    ("Hello.compression", &h.compression),
                    ("Hello.checksums", &h.checksums),
                    ("Hello.resume", &h.resume),
                ] {
                    check_count(field, caps.len(), MAX_CAPABILITIES)?;
                    for c in caps {
                        check_len(field, c.len(), MAX_CAPABILITY_LEN)?;
                    }
                }
                Ok(())
            }
            Message::Welcome(w) => {
                check_text("Welcome.software", &w.software)?;
                check_len(
                    "Welcome.compression",
                    w.compression.len(),
                    MAX_CAPABILITY_LEN,
                )?;
                check_len("Welcome.checksum", w.checksum.len(), MAX_CAPABILITY_LEN)?;
                check_count("Welcome.resume", w.resume.len(), MAX_CAPABILITIES)?;
                for r in &w.resume {
                    check_len("Welcome.resume", r.len(), MAX_CAPABILITY_LEN)?;
                }
                Ok(())
            }
            Message::Refused(r) => check_text("Refused.message", &r.message),
            Message::ListRequest(r) | Message::ListNewest(r) => {
                check_count("ListRequest.roots", r.roots.len(), MAX_LIST_DATASETS)?;
                r.roots
                    .iter()
                    .try_for_each(|root| check_name("ListRequest.roots", &root.dataset))
            }
            Message::ListResponse(r) => {
                check_count("ListResponse.datasets", r.datasets.len(), MAX_LIST_DATASETS)?;
                for d in &r.datasets {
                    check_name("ListResponse.datasets", &d.name)?;
                    check_count(
                        "ListResponse.snapshots",
                        d.snapshots.len(),
                        MAX_SNAPSHOTS_PER_DATASET,
                    )?;
                    for s in &d.snapshots {
                        check_name("ListResponse.snapshots", &s.name)?;
                    }
                }
                Ok(())
            }
            Message::StepHeader(h) => h.validate(),
            Message::StepStart(r) => r.validate(),
            Message::StepBegin(b) => b.validate(),
            Message::StepWith(w) => {
                w.begin.validate()?;
                w.properties.validate()
            }
            Message::PartialReceives(p) => {
                check_count(
                    "PartialReceives.partial",
                    p.partial.len(),
                    MAX_LIST_DATASETS,
                )?;
                p.partial.iter().try_for_each(|r| {
                    check_name("PartialReceives.dataset", &r.dataset)?;
                    check_len("PartialReceives.token", r.token.len(), MAX_RESUME_TOKEN_LEN)
                })
            }
            Message::Resumable(r) => {
                check_count("Resumable.tokens", r.tokens.len(), MAX_LIST_DATASETS)?;
                for t in &r.tokens {
                    check_name("Resumable.dataset", &t.dataset)?;
                    check_name("Resumable.to", &t.to.name)?;
                }
                Ok(())
            }
            Message::StepEnd(_) | Message::StripeChunk(_) => Ok(()),
            Message::Destination(d) => {
                check_count("Destination.features", d.features.len(), MAX_POOL_FEATURES)?;
                for f in &d.features {
                    check_len("Destination.features", f.len(), MAX_CAPABILITY_LEN)?;
                }
                check_count(
                    "Destination.encrypted",
                    d.encrypted.len(),
                    MAX_LIST_DATASETS,
                )?;
                d.encrypted
                    .iter()
                    .try_for_each(|n| check_name("Destination.encrypted", n))
            }
            Message::Stripes(s) => check_stripe("Stripes.count", usize::from(s.count)),
            Message::StripeJoin(j) => check_stripe("StripeJoin.index", usize::from(j.index) + 1),
            Message::StepAbort(a) => check_text("StepAbort.reason", &a.reason),
            Message::Verdict(Verdict::Committed(c)) => {
                check_name("Verdict.dataset", &c.dataset)?;
                check_count(
                    "Verdict.snapshots",
                    c.snapshots.len(),
                    MAX_SNAPSHOTS_PER_DATASET,
                )?;
                c.snapshots
                    .iter()
                    .try_for_each(|s| check_name("Verdict.snapshots", &s.name))
            }
            Message::Prune(p) => check_name("Prune.dataset", &p.dataset),
            Message::PruneBy(p) => {
                check_name("PruneBy.dataset", &p.dataset)?;
                p.grid
                    .as_deref()
                    .map_or(Ok(()), |g| check_len("PruneBy.grid", g.len(), MAX_GRID_LEN))
            }
            Message::Pruned(p) => {
                check_count(
                    "Pruned.destroyed",
                    p.destroyed.len(),
                    MAX_SNAPSHOTS_PER_DATASET,
                )?;
                p.destroyed
                    .iter()
                    .try_for_each(|s| check_name("Pruned.destroyed", s))
            }
            Message::Verdict(Verdict::Failed(e)) | Message::Error(e) => {
                check_text("WireError.message", &e.message)?;
                if let Some(s) = &e.receiver_newest {
                    check_name("WireError.receiver_newest", &s.name)?;
                }
                Ok(())
            }
        }
    }
}

/// A field of a decoded message exceeded its limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {actual} exceeds the limit of {limit}")]
pub struct LimitError {
    /// `Message.field` that was too large.
    pub field: &'static str,
    /// Its size (bytes or entries).
    pub actual: usize,
    /// The limit from [`crate::limits`].
    pub limit: usize,
}

fn check_len(field: &'static str, actual: usize, limit: usize) -> Result<(), LimitError> {
    if actual > limit {
        return Err(LimitError {
            field,
            actual,
            limit,
        });
    }
    Ok(())
}
use check_len as check_count;

/// A stripe count (or index + 1) must be 1..=[`MAX_STRIPES`].
fn check_stripe(field: &'static str, n: usize) -> Result<(), LimitError> {
    if n == 0 {
        return Err(LimitError {
            field,
            actual: 0,
            limit: MAX_STRIPES,
        });
    }
    check_len(field, n, MAX_STRIPES)
}

fn check_name(field: &'static str, s: &str) -> Result<(), LimitError> {
    check_len(field, s.len(), MAX_NAME_LEN)
}

fn check_text(field: &'static str, s: &str) -> Result<(), LimitError> {
    check_len(field, s.len(), MAX_TEXT_LEN)
}

/// Sender's opening message. Capabilities are names (not enums) so that a peer ignores the
/// ones it does not know instead of failing to decode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// Lowest protocol version the sender speaks.
    pub min_version: u16,
    /// Highest protocol version the sender speaks.
    pub max_version: u16,
    /// Compression codecs the sender can produce, in order of preference (`"none"`, `"zstd"`).
    pub compression: Vec<String>,
    /// Checksums the sender can compute (`"blake3"`).
    pub checksums: Vec<String>,
    /// Resume kinds the sender supports (`"zfs-token"`, `"spool"`).
    pub resume: Vec<String>,
    /// Free text, e.g. `zq-send 0.1.0`, for logs only.
    pub software: String,
}

/// The receiver's acceptance: the agreed version and one choice per capability kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version both sides now speak.
    pub version: u16,
    /// Compression the sender may use (one of those it offered).
    pub compression: String,
    /// Checksum both sides use.
    pub checksum: String,
    /// Resume kinds both sides support.
    pub resume: Vec<String>,
    /// Free text, e.g. `zq-recv 0.1.0`, for logs only.
    pub software: String,
}

/// Why a handshake was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable reason.
    pub reason: RefusalReason,
    /// Lowest version the refusing side speaks.
    pub min_version: u16,
    /// Highest version the refusing side speaks.
    pub max_version: u16,
    /// Human-readable explanation.
    pub message: String,
}

/// Machine-readable handshake refusal reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// The version ranges do not overlap.
    VersionMismatch,
    /// No common checksum (or another mandatory capability).
    NoCommonCapability,
    /// The first frame was not a valid `Hello`.
    BadHello,
}

/// Request the snapshot lists of several datasets (and optionally their descendants) at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRequest {
    /// The datasets to list, on the receiver.
    pub roots: Vec<ListRoot>,
}

/// One entry of a [`ListRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRoot {
    /// Full dataset name on the receiver.
    pub dataset: String,
    /// Also list every descendant.
    pub recursive: bool,
}

/// Every existing dataset under the requested roots, with its snapshots. A requested dataset
/// that does not exist is simply absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    /// Existing datasets, parents before children.
    pub datasets: Vec<DatasetSnapshots>,
}

/// One dataset and its snapshots, oldest first (by `createtxg`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSnapshots {
    /// Full dataset name.
    pub name: String,
    /// Snapshots, oldest first.
    pub snapshots: Vec<SnapshotInfo>,
}

/// A snapshot as both sides see it. Identity is the GUID; the name is for people.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The part after `@`.
    pub name: String,
    /// ZFS's GUID of the snapshot, identical on every copy.
    pub guid: u64,
    /// Transaction group that created it on this pool (orders snapshots on one side only).
    pub createtxg: u64,
}

/// A snapshot named in a step: name for people, GUID for identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapRef {
    /// The part after `@`.
    pub name: String,
    /// ZFS's GUID of the snapshot.
    pub guid: u64,
}

/// First frame of a step: what is about to be sent and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepHeader {
    /// Source dataset on the sender (for logs and errors).
    pub source: String,
    /// Target dataset on the receiver; must be inside the sender's allowed root.
    pub target: String,
    /// Incremental base, or `None` for a full stream.
    pub from: Option<SnapRef>,
    /// The snapshot this step ends with. From version 2 its GUID may be 0: a snapshot the
    /// sender just created, whose GUID the receiver takes from the stream's BEGIN record
    /// (or, with intermediates, from its listing after the receive) and reports in
    /// [`Committed::guid`].
    pub to: SnapRef,
    /// The stream carries every snapshot between `from` and `to` (`zfs send -I`).
    pub intermediates: bool,
    /// What the receiver may destroy before receiving (only with the user's `--force`).
    pub force: ForceAction,
    /// Compression of the data chunks, one of the names agreed in the handshake.
    pub compression: String,
}

impl StepHeader {
    fn validate(&self) -> Result<(), LimitError> {
        check_name("StepHeader.source", &self.source)?;
        check_name("StepHeader.target", &self.target)?;
        check_name("StepHeader.to", &self.to.name)?;
        if let Some(from) = &self.from {
            check_name("StepHeader.from", &from.name)?;
        }
        if let ForceAction::RollbackTo(s) = &self.force {
            check_name("StepHeader.force", &s.name)?;
        }
        Ok(())
    }
}

/// A step the receiver can resume: which step it was, and the verified prefix of its
/// stream the receiver holds. The sender regenerates the same stream, checks that its
/// first `offset` bytes hash to `prefix_hash`, and sends the rest after a [`StepStart`] with [`ResumeAt`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeToken {
    /// Target dataset on the receiver.
    pub dataset: String,
    /// GUID of the step's incremental base, `None` for a full stream.
    pub from_guid: Option<u64>,
    /// The snapshot the step ends with (its GUID is 0 for an `-I` stream, which does not
    /// name it in its first record).
    pub to: SnapRef,
    /// Whether the stream carries intermediate snapshots (`zfs send -I`).
    pub intermediates: bool,
    /// Verified bytes the receiver holds.
    pub offset: u64,
    /// BLAKE3 of those bytes.
    pub prefix_hash: [u8; 32],
}

/// The receiver's resumable steps (see [`Message::Resumable`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumable {
    /// One per target with a spooled step.
    pub tokens: Vec<ResumeToken>,
}

/// First frame of a step from version 3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStart {
    /// The step, as version 2 announced it.
    pub header: StepHeader,
    /// The sender job's user-hold tag on the receiver (`zq_<job>_last`; empty for none).
    /// The receiver refuses other names.
    pub last_tag: String,
    /// Move `last_tag` to the received snapshot once it is committed (from the step's
    /// base), so that pruning on the receiver cannot break the chain
    /// (`guarantee_resumability`, `guarantee_incremental`). Without it the receiver removes
    /// the tag it placed before (a mode switch).
    pub hold_last: bool,
    /// The step continues the receiver's spooled one (only with [`RESUME_SPOOL`]).
    pub resume: Option<ResumeAt>,
}

/// What the destination of a listing can receive (version 6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    /// The feature flags enabled (or active) on the pool of every listed root, by name
    /// without `feature@` (`encryption`, `lz4_compress`, `large_blocks` …): a stream needing
    /// one the pool lacks cannot be received. Empty where pools have none (zfs-fuse).
    pub features: Vec<String>,
    /// The receiver accepts only raw sends of encrypted datasets (`zq-recv
    /// --require-encrypted`); it refuses any other stream.
    pub require_raw: bool,
    /// The listed datasets that are encrypted, and for a requested root that does not
    /// exist, its nearest existing ancestor if that is encrypted: what a new target would
    /// inherit. A non-raw stream received there is encrypted by the receiver (or, without
    /// its key, refused).
    pub encrypted: Vec<String>,
}

impl StepStart {
    fn validate(&self) -> Result<(), LimitError> {
        self.header.validate()?;
        check_len("StepStart.last_tag", self.last_tag.len(), MAX_TAG_LEN)
    }
}

/// The targets an interrupted `zfs receive -s` left partial (version 7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialReceives {
    /// One per such target under the listed roots; none that a step is receiving into.
    pub partial: Vec<PartialReceive>,
}

/// One target's partial receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialReceive {
    /// The target dataset.
    pub dataset: String,
    /// Its `receive_resume_token` (at most [`MAX_RESUME_TOKEN_LEN`] bytes): what `zfs send
    /// -t` continues from. Hostile input to the sender: it checks the charset and decodes
    /// it before it uses it, and passes it to zfs only as one argv element.
    pub token: String,
}

/// First frame of a step from version 7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepBegin {
    /// The step, as version 3 announced it (its `resume` is for the `spool` kind).
    pub start: StepStart,
    /// The data are `zfs send -t` of this token: the rest of the target's partial receive,
    /// which must still have this very token (else `ResumeRejected`).
    pub resume_token: Option<String>,
    /// Discard the target's partial receive (`zfs receive -A`) before this step: the
    /// sender will not continue it.
    pub discard_partial: bool,
}

impl StepBegin {
    fn validate(&self) -> Result<(), LimitError> {
        self.start.validate()?;
        self.resume_token.as_deref().map_or(Ok(()), |t| {
            check_len("StepBegin.resume_token", t.len(), MAX_RESUME_TOKEN_LEN)
        })
    }
}

/// First frame of a step from version 8 that has properties ([`StepProperties`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepWith {
    /// The step, as version 7 announced it.
    pub begin: StepBegin,
    /// Its properties.
    pub properties: StepProperties,
}

/// The properties of a step (version 8). The receiver checks every name and value, never
/// applies the source's `mountpoint`, `canmount`, `sharenfs` or `sharesmb` (it excludes
/// them whenever the stream carries properties), refuses a request to set those or any
/// encryption property, and sets what it forces itself (`zq-recv --force-property`)
/// whatever the sender asks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepProperties {
    /// The stream carries the source dataset's properties (`zfs send -p`: a compound
    /// stream even for one snapshot).
    pub carried: bool,
    /// `zfs receive -o PROP=VALUE` the sender asks for (at most [`MAX_STEP_PROPERTIES`]).
    pub set: Vec<(String, String)>,
    /// `zfs receive -x PROP` the sender asks for (at most [`MAX_STEP_PROPERTIES`]).
    pub exclude: Vec<String>,
}

impl StepProperties {
    /// Nothing to carry or ask: the step goes as a [`StepBegin`].
    pub fn is_empty(&self) -> bool {
        !self.carried && self.set.is_empty() && self.exclude.is_empty()
    }

    fn validate(&self) -> Result<(), LimitError> {
        check_count("StepProperties.set", self.set.len(), MAX_STEP_PROPERTIES)?;
        check_count(
            "StepProperties.exclude",
            self.exclude.len(),
            MAX_STEP_PROPERTIES,
        )?;
        for (p, v) in &self.set {
            check_len("StepProperties.set", p.len(), MAX_NAME_LEN)?;
            check_len("StepProperties.set", v.len(), MAX_PROPERTY_VALUE_LEN)?;
        }
        self.exclude
            .iter()
            .try_for_each(|p| check_len("StepProperties.exclude", p.len(), MAX_NAME_LEN))
    }
}

/// Where a resumed step's data continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeAt {
    /// The offset the data chunks start at: the token's.
    pub offset: u64,
    /// BLAKE3 of the stream's first `offset` bytes, as the sender regenerated them.
    pub prefix_hash: [u8; 32],
}

/// Destruction the sender's user authorised with `--force` for this step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForceAction {
    /// Nothing: refuse if the target has diverged.
    None,
    /// Roll the target back to this snapshot (destroying newer ones) before receiving.
    RollbackTo(SnapRef),
    /// The target exists with no snapshot in common: destroy its snapshots and replace it.
    Replace,
}

/// Last frame of a step's data: what the receiver must have seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEnd {
    /// Total bytes of the (uncompressed) send stream.
    pub total_len: u64,
    /// BLAKE3 of the whole (uncompressed) send stream.
    pub hash: [u8; 32],
}

/// The sending side failed mid-stream (e.g. `zfs send` exited non-zero).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepAbort {
    /// Why, for the receiver's log.
    pub reason: String,
}

/// Outcome of one step, from the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The stream was verified and received.
    Committed(Committed),
    /// The step failed; nothing was committed.
    Failed(WireError),
}

/// What a committed step left on the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// Target dataset.
    pub dataset: String,
    /// GUID of the snapshot the step ended with (the header's `to.guid`, or the one the
    /// receiver resolved when the header left it 0).
    pub guid: u64,
    /// The target's snapshots after the receive, oldest first. The receiver may compute
    /// this list rather than list the target; a `createtxg` of 0 then means unknown.
    pub snapshots: Vec<SnapshotInfo>,
}

/// Retention for one target: destroy its `zq_` snapshots except the newest `keep_last`,
/// never the one with `base_guid` (the common base) or anything newer. The receiver decides
/// which snapshots those are from its own listing; a target without that base is left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneRequest {
    /// Target dataset on the receiver.
    pub dataset: String,
    /// How many of the newest `zq_` snapshots to keep.
    pub keep_last: u32,
    /// GUID of the common base, which is never destroyed.
    pub base_guid: u64,
}

/// Retention of one target's `zq_` snapshots (version 4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneBy {
    /// Target dataset on the receiver.
    pub dataset: String,
    /// Keep the newest N `zq_` snapshots.
    pub keep_last: Option<u32>,
    /// Keep what this time grid keeps (`1h=all,24h=1h`, see `zq_repl::retention::Grid`);
    /// the receiver parses it and refuses a bad one.
    pub grid: Option<String>,
    /// GUID of the common base, which is never destroyed (nor anything newer).
    pub base_guid: u64,
    /// Destroy nothing: answer with what would be destroyed.
    pub dry_run: bool,
}

/// A step's chunks from here on are spread over stripe streams (version 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stripes {
    /// Names the set: each of its streams starts with a [`StripeJoin`] of this id. Chosen
    /// at random by the sender; the receiver matches it only among that sender's streams.
    pub id: u64,
    /// How many stripe streams (1..=[`MAX_STRIPES`]).
    pub count: u8,
}

/// Opens a stripe stream of the set [`Stripes::id`] (version 5). Chunk frames follow,
/// each after a [`Message::StripeChunk`] giving its number; the set's chunks are
/// numbered across all its streams, each stream's in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeJoin {
    /// The set's [`Stripes::id`].
    pub id: u64,
    /// This stream's place in the set, below [`Stripes::count`].
    pub index: u8,
}

/// What a [`PruneRequest`] or [`PruneBy`] destroyed (or, in a dry run, would destroy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    /// Names (after `@`) of the destroyed snapshots.
    pub destroyed: Vec<String>,
    /// How many `zq_` snapshots the target holds afterwards; `None` if the request was
    /// skipped (a step into the target was running). Lets the sender skip requests that
    /// would destroy nothing.
    pub remaining: Option<u32>,
}

/// A typed error carried on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// Human-readable detail (may include `zfs` stderr).
    pub message: String,
    /// The receiver's newest snapshot of the target, where it helps (divergence).
    pub receiver_newest: Option<SnapRef>,
}

impl WireError {
    /// An error without a snapshot reference.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let mut message = message.into();
        truncate_utf8(&mut message, MAX_TEXT_LEN);
        WireError {
            kind,
            message,
            receiver_newest: None,
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// Truncates `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Kinds of failure a receiver reports. Whether retrying can help is [`ErrorKind::retryable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The target is outside the sender's allowed root.
    NotAuthorized,
    /// A dataset or snapshot name is not valid.
    InvalidName,
    /// The target has snapshots newer than the base, or none in common with the source.
    Diverged,
    /// The incremental base does not exist on the target.
    BaseMissing,
    /// A full stream was sent but the target already exists.
    TargetExists,
    /// The stream's data did not match its checksums or length.
    Checksum,
    /// The stream ended early or frames arrived out of order.
    Protocol,
    /// The sender aborted the step.
    Aborted,
    /// `zfs receive` (or another zfs command on the receiver) failed.
    Zfs,
    /// The receiver committed a snapshot other than the one the header named.
    GuidMismatch,
    /// Anything else on the receiver.
    Internal,
    /// A resumed [`StepStart`] did not match what the receiver spooled (which it then discards):
    /// send the step afresh.
    ResumeRejected,
}

impl ErrorKind {
    /// Whether retrying the same step later can succeed without anyone changing anything.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Checksum
                | ErrorKind::Protocol
                | ErrorKind::Aborted
                | ErrorKind::Internal
                | ErrorKind::ResumeRejected
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_long_names() {
        let m = Message::ListRequest(ListRequest {
            roots: vec![ListRoot {
                dataset: "a".repeat(MAX_NAME_LEN + 1),
                recursive: false,
            }],
        });
        let err = m.validate().unwrap_err();
        assert_eq!(err.field, "ListRequest.roots");
    }

    #[test]
    fn wire_error_truncates_on_char_boundary() {
        let e = WireError::new(ErrorKind::Zfs, "é".repeat(MAX_TEXT_LEN));
        assert!(e.message.len() <= MAX_TEXT_LEN);
        assert!(e.message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn retryable_kinds() {
        assert!(ErrorKind::Checksum.retryable());
        assert!(!ErrorKind::Diverged.retryable());
        assert!(!ErrorKind::NotAuthorized.retryable());
    }
}
