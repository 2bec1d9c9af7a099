//! The data part of one replication step, on both sides.
//!
//! [`StepEncoder`] hashes each chunk and the whole stream on the sender. [`StepDecoder`]
//! checks them on the receiver and decides which bytes may reach `zfs receive`: a chunk is
//! released only after its own hash matched, and the newest chunk is held back until the
//! `StepEnd` frame confirms the total length and the whole-stream hash. A ZFS stream ends
//! with its END record, so `zfs receive` cannot commit a snapshot from a stream that was
//! not verified to the last byte.
//!
//! One exception: a first chunk of exactly [`BEGIN_CHUNK`] bytes (a ZFS stream's BEGIN
//! record, which the sender sends on its own as soon as `zfs send` wrote it) is released
//! as soon as its hash matches. A ZFS stream is at least a BEGIN and an END record, so that
//! chunk cannot complete one, and `zfs receive` starts its work on it (opening the target,
//! checks, `-F`'s rollback) while the sender's `zfs send` is still running.

use bytes::Bytes;

use crate::codec::Frame;
use crate::message::{Message, StepEnd};

/// The length of a ZFS stream's BEGIN record (`dmu_replay_record_t`): a first chunk of
/// exactly this size is released without waiting for the next one (see the module docs).
pub const BEGIN_CHUNK: usize = 312;

/// How the whole-stream hash in `StepEnd` is computed: the session's checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamDigest {
    /// `"blake3-chunks"`: BLAKE3 over the sequence of chunk lengths and chunk hashes, which
    /// each side computes anyway, so every byte is hashed once per side. A resumed step's
    /// prefix enters as one record: its length and its plain BLAKE3 (the resume token's
    /// prefix hash, which does not depend on how the first attempt was chunked). As strong
    /// as hashing the bytes: a collision needs one in BLAKE3.
    #[default]
    Chunks,
    /// `"blake3"`: BLAKE3 of every byte of the stream, a second pass over the data on each
    /// side. Spoken with peers that do not offer `blake3-chunks`.
    Flat,
}

impl StreamDigest {
    /// Checksum names in a sender's order of preference.
    pub const NAMES: [&'static str; 2] = ["blake3-chunks", "blake3"];

    /// The digest a session's agreed checksum name stands for.
    pub fn from_checksum(name: &str) -> Option<Self> {
        match name {
            "blake3-chunks" => Some(StreamDigest::Chunks),
            "blake3" => Some(StreamDigest::Flat),
            _ => None,
        }
    }
}

/// Domain of the chained digest, so it can never equal the plain hash of some bytes.
const CHAIN_CONTEXT: &str = "zq 2026-11-26 stream digest over chunk hashes";

/// The whole-stream hash as the bytes go by, on either side.
#[derive(Debug, Clone)]
struct StreamHash {
    digest: StreamDigest,
    /// [`StreamDigest::Flat`]: every byte. [`StreamDigest::Chunks`]: a resumed prefix.
    bytes: blake3::Hasher,
    prefix_len: u64,
    /// [`StreamDigest::Chunks`]: the records so far, the prefix's once a chunk came.
    chain: blake3::Hasher,
    sealed: bool,
}

impl Default for StreamHash {
    fn default() -> Self {
        StreamHash::new(StreamDigest::default())
    }
}

impl StreamHash {
    fn new(digest: StreamDigest) -> Self {
        StreamHash {
            digest,
            bytes: blake3::Hasher::new(),
            prefix_len: 0,
            chain: blake3::Hasher::new_derive_key(CHAIN_CONTEXT),
            sealed: false,
        }
    }

    /// Bytes the receiver already holds (a resumed step), before any chunk.
    fn prefix(&mut self, data: &[u8]) {
        debug_assert!(!self.sealed);
        self.bytes.update(data);
        self.prefix_len += data.len() as u64;
    }

    /// BLAKE3 of the prefix accounted for so far.
    fn prefix_hash(&self) -> [u8; 32] {
        *self.bytes.finalize().as_bytes()
    }

    /// A chunk whose own BLAKE3 is `hash`.
    fn chunk(&mut self, data: &[u8], hash: &[u8; 32]) {
        match self.digest {
            StreamDigest::Flat => {
                self.bytes.update(data);
            }
            StreamDigest::Chunks => {
                self.seal();
                Self::record(&mut self.chain, 1, data.len() as u64, hash);
            }
        }
    }

    fn record(chain: &mut blake3::Hasher, kind: u8, len: u64, hash: &[u8; 32]) {
        chain.update(&[kind]);
        chain.update(&len.to_le_bytes());
        chain.update(hash);
    }

    /// Ends the prefix: from now on only chunks come.
    fn seal(&mut self) {
        if !self.sealed {
            self.sealed = true;
            if self.prefix_len > 0 {
                let h = self.prefix_hash();
                Self::record(&mut self.chain, 2, self.prefix_len, &h);
            }
        }
    }

    fn finalize(&self) -> [u8; 32] {
        match self.digest {
            StreamDigest::Flat => *self.bytes.finalize().as_bytes(),
            StreamDigest::Chunks if self.sealed => *self.chain.finalize().as_bytes(),
            StreamDigest::Chunks => {
                let mut all = self.clone();
                all.seal();
                *all.chain.finalize().as_bytes()
            }
        }
    }
}

/// Sender side of one step's data: per-chunk BLAKE3 and the whole-stream digest.
#[derive(Debug, Default)]
pub struct StepEncoder {
    stream: StreamHash,
    total: u64,
}

impl StepEncoder {
    /// A new step, with the default [`StreamDigest`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A new step whose `StepEnd` carries this kind of digest (the session's checksum).
    pub fn with_digest(digest: StreamDigest) -> Self {
        StepEncoder {
            stream: StreamHash::new(digest),
            total: 0,
        }
    }

    /// Accounts for `data` and returns its hash, to be sent in front of it.
    pub fn chunk(&mut self, data: &[u8]) -> [u8; 32] {
        let hash = *blake3::hash(data).as_bytes();
        self.stream.chunk(data, &hash);
        self.total += data.len() as u64;
        hash
    }

    /// Bytes accounted for so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Accounts for the start of a resumed step's stream, which the receiver already holds:
    /// hashed into the whole stream, not sent. Only before the first chunk.
    pub fn prefix(&mut self, data: &[u8]) {
        self.stream.prefix(data);
        self.total += data.len() as u64;
    }

    /// BLAKE3 of the prefix accounted for so far (a resume token's prefix hash).
    pub fn prefix_hash(&self) -> [u8; 32] {
        self.stream.prefix_hash()
    }

    /// The `StepEnd` that closes the data.
    pub fn end(&self) -> StepEnd {
        StepEnd {
            total_len: self.total,
            hash: self.stream.finalize(),
        }
    }
}

/// How a sender compresses its chunks (`--compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Never.
    None,
    /// zstd at this level on every chunk; a chunk that does not shrink goes as it is.
    Zstd(i32),
    /// zstd at [`AUTO_LEVEL`], but a chunk that does not shrink by 1/16 makes the next
    /// ones go uncompressed for a while (1, 2, 4 … 64 chunks), so already-compressed or
    /// encrypted data costs almost nothing; and while the link can carry raw bytes faster
    /// than zstd makes compressed ones ([`Compressor::set_link_rate`]), chunks go raw but
    /// every [`AUTO_PROBE_EVERY`]th, which keeps both figures current.
    #[default]
    Auto,
}

/// zstd level of [`Compression::Auto`]: the fastest positive level.
pub const AUTO_LEVEL: i32 = 1;

/// While the link outruns zstd, [`Compression::Auto`] still compresses one chunk in this
/// many, to measure zstd's speed and the link's rate again.
pub const AUTO_PROBE_EVERY: u32 = 32;

/// The link must be this much faster than zstd before `auto` sends raw (and this much
/// slower before it compresses again): hysteresis, as both figures are noisy.
const AUTO_MARGIN: f64 = 1.25;

/// Chunks smaller than this are not worth compressing (the BEGIN record, a stream's tail).
const MIN_COMPRESS: usize = 4096;

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let range = zstd::compression_level_range();
        match s {
            "none" => Ok(Compression::None),
            "auto" => Ok(Compression::Auto),
            "zstd" => Ok(Compression::Zstd(zstd::DEFAULT_COMPRESSION_LEVEL)),
            _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(level)) if range.contains(&level) => Ok(Compression::Zstd(level)),
                _ => Err(format!(
                    "{s:?}: expected none, auto, zstd or zstd:LEVEL with LEVEL in {}..={}",
                    range.start(),
                    range.end()
                )),
            },
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Auto => f.write_str("auto"),
            Compression::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

/// One chunk as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The bytes themselves.
    Raw(Bytes),
    /// One zstd frame of them.
    Zstd {
        /// Length of the original chunk.
        raw_len: usize,
        /// The compressed bytes (fewer than `raw_len`).
        data: Bytes,
    },
}

impl Payload {
    /// Bytes this chunk puts on the wire, without the frame header.
    pub fn wire_len(&self) -> usize {
        match self {
            Payload::Raw(b) => b.len(),
            Payload::Zstd { data, .. } => data.len(),
        }
    }
}

/// Sender side: compresses chunks per a [`Compression`], one zstd context per step.
pub struct Compressor {
    mode: Compression,
    ctx: Option<zstd::bulk::Compressor<'static>>,
    /// Chunks still to send uncompressed after one that did not shrink (auto).
    skip: u32,
    /// How many to skip after the next one that does not shrink (auto).
    backoff: u32,
    /// zstd's speed on this host, raw bytes per second (a moving average), once measured.
    speed: Option<f64>,
    /// What the link can carry, bytes per second, as the sender last estimated it.
    link: Option<f64>,
    /// Sending raw because the link outruns zstd (auto).
    outrun: bool,
    /// Chunks since the last one compressed while `outrun`.
    since_probe: u32,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("mode", &self.mode)
            .field("skip", &self.skip)
            .finish_non_exhaustive()
    }
}

impl Compressor {
    /// A compressor for one step (`Compression::None`: every chunk goes raw). The zstd
    /// context is made on the first chunk worth compressing, so small steps never pay for
    /// it; a context that cannot be made (out of memory) leaves every chunk raw.
    pub fn new(mode: Compression) -> Self {
        Compressor {
            mode,
            ctx: None,
            skip: 0,
            backoff: 1,
            speed: None,
            link: None,
            outrun: false,
            since_probe: 0,
        }
    }

    /// What the link can carry now, in bytes per second (the sender's estimate: congestion
    /// window over round-trip time, or a rate limit). With [`Compression::Auto`], chunks go
    /// raw while this is well above zstd's measured speed: compressing would then slow the
    /// transfer down, whatever it saves on the wire.
    pub fn set_link_rate(&mut self, bytes_per_sec: f64) {
        self.link = Some(bytes_per_sec);
        self.update_outrun();
    }

    /// How long zstd took for a chunk of `raw_len` bytes (the caller times
    /// [`Compressor::compress`] on the chunks [`Compressor::will_try`] accepted).
    pub fn record_speed(&mut self, raw_len: usize, secs: f64) {
        if secs <= 0.0 || raw_len < MIN_COMPRESS {
            return;
        }
        let now = raw_len as f64 / secs;
        self.speed = Some(match self.speed {
            Some(s) => 0.75 * s + 0.25 * now,
            None => now,
        });
        self.update_outrun();
    }

    fn update_outrun(&mut self) {
        if self.mode != Compression::Auto {
            return;
        }
        if let (Some(speed), Some(link)) = (self.speed, self.link) {
            if !self.outrun && link > speed * AUTO_MARGIN {
                self.outrun = true;
                self.since_probe = 0;
            } else if self.outrun && link * AUTO_MARGIN < speed {
                self.outrun = false;
            }
        }
    }

    /// Whether the link outruns zstd and this chunk goes raw (auto), not a probe.
    fn outrun_skips(&self) -> bool {
        self.outrun && self.since_probe + 1 < AUTO_PROBE_EVERY
    }

    /// Whether any chunk may be compressed (the step header says `zstd`).
    pub fn is_active(&self) -> bool {
        self.mode != Compression::None
    }

    /// Whether [`Compressor::compress`] would run zstd on a chunk of `len` bytes (and so
    /// take CPU time worth moving off an async runtime), rather than pass it through.
    pub fn will_try(&self, len: usize) -> bool {
        self.mode != Compression::None
            && len >= MIN_COMPRESS
            && self.skip == 0
            && !self.outrun_skips()
    }

    /// The chunk as it should go on the wire.
    pub fn compress(&mut self, chunk: Bytes) -> Payload {
        let level = match self.mode {
            Compression::None => return Payload::Raw(chunk),
            Compression::Auto => AUTO_LEVEL,
            Compression::Zstd(level) => level,
        };
        if chunk.len() < MIN_COMPRESS {
            return Payload::Raw(chunk);
        }
        if self.skip > 0 {
            self.skip -= 1;
            return Payload::Raw(chunk);
        }
        if self.outrun {
            if self.outrun_skips() {
                self.since_probe += 1;
                return Payload::Raw(chunk);
            }
            self.since_probe = 0;
        }
        if self.ctx.is_none() {
            match zstd::bulk::Compressor::new(level) {
                Ok(c) => self.ctx = Some(c),
                Err(_) => {
                    self.mode = Compression::None;
                    return Payload::Raw(chunk);
                }
            }
        }
        let Some(ctx) = self.ctx.as_mut() else {
            return Payload::Raw(chunk);
        };
        match ctx.compress(&chunk) {
            Ok(out) if out.len() < chunk.len() - chunk.len() / 16 => {
                self.backoff = 1;
                Payload::Zstd {
                    raw_len: chunk.len(),
                    data: Bytes::from(out),
                }
            }
            Ok(out) if out.len() < chunk.len() && self.mode != Compression::Auto => Payload::Zstd {
                raw_len: chunk.len(),
                data: Bytes::from(out),
            },
            _ => {
                if self.mode == Compression::Auto {
                    self.skip = self.backoff;
                    self.backoff = (self.backoff * 2).min(64);
                }
                Payload::Raw(chunk)
            }
        }
    }
}

/// What the receiver should do after a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepEvent {
    /// Nothing to write yet (the chunk is held back).
    Nothing,
    /// These verified bytes may be written to `zfs receive`.
    Data(Bytes),
    /// The stream is complete and verified: write `last` (if any), then close stdin.
    Complete {
        /// The held-back final chunk.
        last: Option<Bytes>,
        /// Total bytes of the stream.
        total_len: u64,
    },
}

/// The step's data failed verification or arrived out of order. Nothing after the last
/// released chunk has reached `zfs receive`, and the held-back chunk never will.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// A chunk's bytes do not match its hash.
    #[error("chunk at stream offset {offset} ({len} bytes) failed its BLAKE3 check")]
    ChunkChecksum {
        /// Offset of the chunk in the stream.
        offset: u64,
        /// Its length.
        len: usize,
    },
    /// `StepEnd` claims a length other than what arrived.
    #[error("stream length mismatch: sender says {claimed} bytes, received {received}")]
    LengthMismatch {
        /// From `StepEnd`.
        claimed: u64,
        /// Counted here.
        received: u64,
    },
    /// Every chunk matched but the whole-stream hash did not (a chunk lost or reordered).
    #[error("whole-stream BLAKE3 mismatch after {0} bytes")]
    StreamChecksum(u64),
    /// The sender aborted the step.
    #[error("sender aborted the step: {0}")]
    Aborted(String),
    /// A frame that does not belong here.
    #[error("unexpected {got} frame during step data")]
    Unexpected {
        /// The frame's name.
        got: &'static str,
    },
    /// A compressed chunk did not decompress to the length it claimed.
    #[error("compressed chunk at stream offset {offset} does not decompress: {reason}")]
    Decompress {
        /// Offset of the chunk in the stream.
        offset: u64,
        /// What zstd said.
        reason: String,
    },
    /// The stream ended before `StepEnd`.
    #[error("stream ended after {0} bytes without StepEnd")]
    Truncated(u64),
}

/// Receiver side of one step's data.
#[derive(Default)]
pub struct StepDecoder {
    stream: StreamHash,
    total: u64,
    pending: Option<Bytes>,
    done: bool,
    /// Present when the step's header said `zstd`: compressed chunks are accepted.
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for StepDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepDecoder")
            .field("total", &self.total)
            .field("digest", &self.stream.digest)
            .field("done", &self.done)
            .field("zstd", &self.zstd.is_some())
            .finish_non_exhaustive()
    }
}

impl StepDecoder {
    /// A new step, after its header was accepted: plain chunks only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new step whose header announced zstd: compressed chunks are accepted too.
    pub fn with_zstd() -> std::io::Result<Self> {
        Ok(StepDecoder {
            zstd: Some(zstd::bulk::Decompressor::new()?),
            ..Self::default()
        })
    }

    /// Expects this kind of whole-stream digest in `StepEnd` (the session's checksum)
    /// instead of the default.
    pub fn digest(mut self, digest: StreamDigest) -> Self {
        debug_assert!(self.total == 0);
        self.stream = StreamHash::new(digest);
        self
    }

    /// Bytes verified so far (including the held-back chunk).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Accounts for the start of a resumed step's stream, replayed from the receiver's own
    /// spool before any frame: the whole-stream hash in `StepEnd` covers it. Call it only
    /// before the first frame.
    pub fn prefix(&mut self, data: &[u8]) {
        debug_assert!(self.pending.is_none() && !self.done);
        self.stream.prefix(data);
        self.total += data.len() as u64;
    }

    /// Feeds one frame.
    pub fn on_frame(&mut self, frame: Frame) -> Result<StepEvent, TransferError> {
        if self.done {
            return Err(TransferError::Unexpected { got: frame.name() });
        }
        let (hash, data) = match frame {
            Frame::Compressed {
                hash,
                raw_len,
                data,
            } => {
                let Some(z) = self.zstd.as_mut() else {
                    self.pending = None;
                    return Err(TransferError::Unexpected { got: "Compressed" });
                };
                // At most raw_len (<= MAX_CHUNK_LEN) bytes come out, whatever the input.
                let raw = z
                    .decompress(&data, raw_len as usize)
                    .map_err(|e| e.to_string())
                    .and_then(|raw| {
                        if raw.len() == raw_len as usize {
                            Ok(raw)
                        } else {
                            Err(format!("{} bytes instead of {raw_len}", raw.len()))
                        }
                    });
                match raw {
                    Ok(raw) => (hash, Bytes::from(raw)),
                    Err(reason) => {
                        self.pending = None;
                        return Err(TransferError::Decompress {
                            offset: self.total,
                            reason,
                        });
                    }
                }
            }
            Frame::Data { hash, data } => (hash, data),
            Frame::Message(m) => return self.on_message(m),
        };
        self.on_data(hash, data)
    }

    fn on_data(&mut self, hash: [u8; 32], data: Bytes) -> Result<StepEvent, TransferError> {
        if blake3::hash(&data).as_bytes() != &hash {
            self.pending = None;
            return Err(TransferError::ChunkChecksum {
                offset: self.total,
                len: data.len(),
            });
        }
        self.stream.chunk(&data, &hash);
        let first = self.total == 0;
        self.total += data.len() as u64;
        if first && data.len() == BEGIN_CHUNK {
            return Ok(StepEvent::Data(data));
        }
        Ok(match self.pending.replace(data) {
            Some(prev) => StepEvent::Data(prev),
            None => StepEvent::Nothing,
        })
    }

    fn on_message(&mut self, m: Message) -> Result<StepEvent, TransferError> {
        match m {
            Message::StepEnd(end) => {
                self.done = true;
                let last = self.pending.take();
                if end.total_len != self.total {
                    return Err(TransferError::LengthMismatch {
                        claimed: end.total_len,
                        received: self.total,
                    });
                }
                if self.stream.finalize() != end.hash {
                    return Err(TransferError::StreamChecksum(self.total));
                }
                Ok(StepEvent::Complete {
                    last,
                    total_len: self.total,
                })
            }
            Message::StepAbort(a) => {
                self.done = true;
                self.pending = None;
                Err(TransferError::Aborted(a.reason))
            }
            other => {
                self.pending = None;
                Err(TransferError::Unexpected { got: other.name() })
            }
        }
    }

    /// The peer finished its side of the stream: anything before `StepEnd` is truncation.
    pub fn on_eof(&self) -> Result<(), TransferError> {
        if self.done {
            Ok(())
        } else {
            Err(TransferError::Truncated(self.total))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode, encode_data_header, encode_zstd_header};
    use proptest::prelude::*;

    /// Text-like bytes zstd shrinks a lot.
    fn compressible(len: usize) -> Bytes {
        let words = b"zfs send receive snapshot stream dataset pool ";
        Bytes::from(
            (0..len)
                .map(|i| words[(i * 7 + i / 13) % words.len()])
                .collect::<Vec<_>>(),
        )
    }

    fn random(len: usize, seed: &[u8]) -> Bytes {
        let mut b = vec![0u8; len];
        blake3::Hasher::new()
            .update(seed)
            .finalize_xof()
            .fill(&mut b);
        Bytes::from(b)
    }

    /// The chunk as frame bytes on the wire, decoded again.
    fn over_the_wire(hash: &[u8; 32], payload: Payload) -> Frame {
        let mut wire = BytesMut::new();
        match payload {
            Payload::Raw(d) => {
                wire.extend_from_slice(&encode_data_header(hash, d.len()));
                wire.extend_from_slice(&d);
            }
            Payload::Zstd { raw_len, data } => {
                wire.extend_from_slice(&encode_zstd_header(hash, raw_len, data.len()));
                wire.extend_from_slice(&data);
            }
        }
        let frame = decode(&mut wire).unwrap().unwrap();
        assert!(wire.is_empty());
        frame
    }

    #[test]
    fn compression_modes_parse_and_print() {
        assert_eq!("none".parse(), Ok(Compression::None));
        assert_eq!("auto".parse(), Ok(Compression::Auto));
        assert_eq!("zstd".parse(), Ok(Compression::Zstd(3)));
        assert_eq!("zstd:19".parse(), Ok(Compression::Zstd(19)));
        assert_eq!("zstd:-5".parse(), Ok(Compression::Zstd(-5)));
        for bad in ["zstd:99", "zstd:", "lz4", "ZSTD"] {
            let err = bad.parse::<Compression>().unwrap_err();
            assert!(err.contains("none, auto, zstd"), "{err}");
        }
        assert_eq!(Compression::Zstd(7).to_string(), "zstd:7");
    }

    #[test]
    fn a_compressed_chunk_is_verified_against_the_original_bytes() {
        let chunk = compressible(256 * 1024);
        let mut enc = StepEncoder::new();
        let hash = enc.chunk(&chunk);
        let payload = Compressor::new(Compression::Auto).compress(chunk.clone());
        assert!(
            payload.wire_len() < chunk.len() / 4,
            "{}",
            payload.wire_len()
        );
        let frame = over_the_wire(&hash, payload);
        assert!(matches!(frame, Frame::Compressed { .. }));
        let mut dec = StepDecoder::with_zstd().unwrap();
        assert_eq!(dec.on_frame(frame).unwrap(), StepEvent::Nothing);
        let end = enc.end();
        assert_eq!(
            dec.on_frame(Frame::Message(Message::StepEnd(end))).unwrap(),
            StepEvent::Complete {
                last: Some(chunk),
                total_len: 256 * 1024
            }
        );
    }

    /// `auto` sends raw while the link outruns zstd (one probe in AUTO_PROBE_EVERY), and
    /// compresses again once the link is the slower; other modes ignore the link.
    #[test]
    fn auto_sends_raw_while_the_link_outruns_zstd() {
        let chunk = compressible(256 * 1024);
        let compressed = |c: &mut Compressor, n: u32| {
            (0..n)
                .filter(|_| matches!(c.compress(chunk.clone()), Payload::Zstd { .. }))
                .count()
        };
        let mut auto = Compressor::new(Compression::Auto);
        // Nothing measured yet: compress.
        assert_eq!(compressed(&mut auto, 4), 4);
        auto.record_speed(1 << 20, 0.005); // zstd: 200 MB/s
        auto.set_link_rate(1e9); // a 1 GB/s link
        assert_eq!(compressed(&mut auto, 2 * AUTO_PROBE_EVERY), 2);
        assert!(!auto.will_try(chunk.len()));
        // Within the margin either way: no flapping.
        auto.set_link_rate(180e6);
        assert_eq!(compressed(&mut auto, AUTO_PROBE_EVERY), 1);
        auto.set_link_rate(100e6); // now the link is the bottleneck
        assert!(auto.will_try(chunk.len()));
        assert_eq!(compressed(&mut auto, 8), 8);
        let mut zstd = Compressor::new(Compression::Zstd(1));
        zstd.record_speed(1 << 20, 0.005);
        zstd.set_link_rate(1e9);
        assert_eq!(compressed(&mut zstd, 8), 8);
    }

    #[test]
    fn compressed_frames_are_refused_where_zstd_was_not_agreed() {
        let chunk = compressible(64 * 1024);
        let hash = *blake3::hash(&chunk).as_bytes();
        let payload = Compressor::new(Compression::Zstd(1)).compress(chunk);
        let frame = over_the_wire(&hash, payload);
        assert_eq!(
            StepDecoder::new().on_frame(frame),
            Err(TransferError::Unexpected { got: "Compressed" })
        );
    }

    #[test]
    fn a_compressed_chunk_cannot_expand_past_its_claimed_length() {
        // 1 MiB of zeros compresses to a few bytes; the frame claims 1000.
        let big = vec![0u8; 1 << 20];
        let data = Bytes::from(zstd::bulk::compress(&big, 1).unwrap());
        let frame = Frame::Compressed {
            hash: *blake3::hash(&big[..1000]).as_bytes(),
            raw_len: 1000,
            data,
        };
        let err = StepDecoder::with_zstd()
            .unwrap()
            .on_frame(frame)
            .unwrap_err();
        assert!(
            matches!(err, TransferError::Decompress { offset: 0, .. }),
            "{err}"
        );
        // Garbage is an error too, not a panic.
        let frame = Frame::Compressed {
            hash: [0; 32],
            raw_len: 100,
            data: Bytes::from_static(b"not zstd at all"),
        };
        assert!(matches!(
            StepDecoder::with_zstd().unwrap().on_frame(frame),
            Err(TransferError::Decompress { .. })
        ));
    }

    #[test]
    fn auto_leaves_incompressible_chunks_raw_and_backs_off() {
        let mut auto = Compressor::new(Compression::Auto);
        assert!(matches!(
            auto.compress(random(256 * 1024, b"a")),
            Payload::Raw(_)
        ));
        // The next chunk is not even tried, however well it would compress...
        assert!(matches!(
            auto.compress(compressible(256 * 1024)),
            Payload::Raw(_)
        ));
        // ...the one after is.
        assert!(matches!(
            auto.compress(compressible(256 * 1024)),
            Payload::Zstd { .. }
        ));
        assert!(!auto.will_try(1000), "small chunks are never tried");
        assert!(auto.will_try(256 * 1024));
        // A fixed level tries every chunk and still never sends one that grew.
        let mut fixed = Compressor::new(Compression::Zstd(3));
        for seed in [b"b", b"c"] {
            assert!(matches!(
                fixed.compress(random(64 * 1024, seed)),
                Payload::Raw(_)
            ));
        }
        // Small chunks (the BEGIN record) go raw.
        assert!(matches!(fixed.compress(compressible(312)), Payload::Raw(_)));
    }

    proptest! {
        #[test]
        fn any_chunk_round_trips_through_any_mode(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            repeat in 1usize..8,
            level in prop_oneof![Just(Compression::Auto), Just(Compression::Zstd(1)), Just(Compression::None)],
        ) {
            let chunk = Bytes::from(data.repeat(repeat));
            let mut enc = StepEncoder::new();
            let hash = enc.chunk(&chunk);
            let frame = over_the_wire(&hash, Compressor::new(level).compress(chunk.clone()));
            let mut dec = StepDecoder::with_zstd().unwrap();
            dec.on_frame(frame).unwrap();
            let got = dec.on_frame(Frame::Message(Message::StepEnd(enc.end()))).unwrap();
            prop_assert_eq!(got, StepEvent::Complete { total_len: chunk.len() as u64, last: Some(chunk) });
        }
    }

    #[test]
    fn a_resumed_step_verifies_the_whole_stream() {
        let stream: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let (head, tail) = stream.split_at(4000);
        for digest in [StreamDigest::Chunks, StreamDigest::Flat] {
            let mut sender = StepEncoder::with_digest(digest);
            sender.prefix(head);
            // The token's prefix hash is the plain hash either way: the first attempt's
            // chunking is not known when resuming.
            assert_eq!(sender.prefix_hash(), *blake3::hash(head).as_bytes());
            let hash = sender.chunk(tail);
            let mut dec = StepDecoder::new().digest(digest);
            dec.prefix(head);
            let data = Bytes::copy_from_slice(tail);
            assert_eq!(
                dec.on_frame(Frame::Data { hash, data }).unwrap(),
                StepEvent::Nothing
            );
            let end = sender.end();
            assert_eq!(end.total_len, 10_000);
            assert_eq!(
                end.hash == *blake3::hash(&stream).as_bytes(),
                digest == StreamDigest::Flat
            );
            assert!(matches!(
                dec.on_frame(Frame::Message(Message::StepEnd(end.clone()))),
                Ok(StepEvent::Complete {
                    total_len: 10_000,
                    ..
                })
            ));
            // A receiver whose prefix differs (a flipped bit in its spool) refuses the end.
            let mut bad = head.to_vec();
            bad[17] ^= 1;
            let mut dec = StepDecoder::new().digest(digest);
            dec.prefix(&bad);
            let data = Bytes::copy_from_slice(tail);
            dec.on_frame(Frame::Data { hash, data }).unwrap();
            assert_eq!(
                dec.on_frame(Frame::Message(Message::StepEnd(end))),
                Err(TransferError::StreamChecksum(10_000)),
                "{digest:?}"
            );
        }
    }

    /// Each chunk matches its own hash, but the sequence is wrong: only the stream digest
    /// can tell, in both kinds.
    #[test]
    fn swapped_chunks_fail_the_stream_digest() {
        let (a, b) = (vec![1u8; 5000], vec![2u8; 5000]);
        for digest in [StreamDigest::Chunks, StreamDigest::Flat] {
            let mut enc = StepEncoder::with_digest(digest);
            let (ha, hb) = (enc.chunk(&a), enc.chunk(&b));
            let mut dec = StepDecoder::new().digest(digest);
            dec.on_frame(Frame::Data {
                hash: hb,
                data: Bytes::from(b.clone()),
            })
            .unwrap();
            dec.on_frame(Frame::Data {
                hash: ha,
                data: Bytes::from(a.clone()),
            })
            .unwrap();
            assert_eq!(
                dec.on_frame(Frame::Message(Message::StepEnd(enc.end()))),
                Err(TransferError::StreamChecksum(10_000)),
                "{digest:?}"
            );
        }
        // Both sides must agree on the kind.
        let mut enc = StepEncoder::with_digest(StreamDigest::Flat);
        let hash = enc.chunk(&a);
        let mut dec = StepDecoder::new().digest(StreamDigest::Chunks);
        dec.on_frame(Frame::Data {
            hash,
            data: Bytes::from(a.clone()),
        })
        .unwrap();
        assert!(dec
            .on_frame(Frame::Message(Message::StepEnd(enc.end())))
            .is_err());
        assert_eq!(
            StreamDigest::NAMES.map(StreamDigest::from_checksum),
            [Some(StreamDigest::Chunks), Some(StreamDigest::Flat)]
        );
    }
    use crate::message::StepAbort;
    use bytes::{BufMut, BytesMut};

    /// Encodes a whole step's data as the sender would, into one byte buffer.
    fn sender_wire(chunks: &[Vec<u8>]) -> BytesMut {
        let mut enc = StepEncoder::new();
        let mut wire = BytesMut::new();
        for c in chunks {
            let h = enc.chunk(c);
            wire.put_slice(&encode_data_header(&h, c.len()));
            wire.put_slice(c);
        }
        encode(&Message::StepEnd(enc.end()), &mut wire).unwrap();
        wire
    }

    /// Drives a decoder over `wire`, feeding it in pieces of `piece` bytes like a network
    /// would; returns the bytes released to `zfs receive` and the outcome.
    fn receiver_run(wire: &[u8], piece: usize) -> (Vec<u8>, Result<u64, String>) {
        let mut dec = StepDecoder::new();
        let mut buf = BytesMut::new();
        let mut released = Vec::new();
        for part in wire.chunks(piece.max(1)) {
            buf.put_slice(part);
            loop {
                match decode(&mut buf) {
                    Ok(Some(f)) => match dec.on_frame(f) {
                        Ok(StepEvent::Nothing) => {}
                        Ok(StepEvent::Data(d)) => released.extend_from_slice(&d),
                        Ok(StepEvent::Complete { last, total_len }) => {
                            if let Some(l) = last {
                                released.extend_from_slice(&l);
                            }
                            return (released, Ok(total_len));
                        }
                        Err(e) => return (released, Err(e.to_string())),
                    },
                    Ok(None) => break,
                    Err(e) => return (released, Err(e.to_string())),
                }
            }
        }
        (released, dec.on_eof().map(|_| 0).map_err(|e| e.to_string()))
    }

    #[test]
    fn clean_stream_is_released_whole() {
        let chunks = vec![b"abc".to_vec(), b"defg".to_vec(), vec![7; 1000]];
        let (out, r) = receiver_run(&sender_wire(&chunks), 5);
        assert_eq!(r, Ok(1007));
        assert_eq!(out, chunks.concat());
    }

    #[test]
    fn last_chunk_is_held_back_until_end() {
        let mut dec = StepDecoder::new();
        let d = Bytes::from_static(b"only chunk");
        let hash = *blake3::hash(&d).as_bytes();
        assert_eq!(
            dec.on_frame(Frame::Data {
                hash,
                data: d.clone()
            }),
            Ok(StepEvent::Nothing)
        );
        // Truncation right here: the only chunk never leaves the decoder.
        assert_eq!(dec.on_eof(), Err(TransferError::Truncated(10)));
    }

    #[test]
    fn a_begin_record_alone_is_released_at_once_and_the_rest_held_back() {
        let begin = vec![1; BEGIN_CHUNK];
        let (mut dec, mut got) = (StepDecoder::new(), Vec::new());
        for chunk in [begin.clone(), vec![2; 100], vec![3; 50]] {
            let data = Bytes::from(chunk);
            let hash = *blake3::hash(&data).as_bytes();
            got.push(dec.on_frame(Frame::Data { hash, data }).unwrap());
        }
        assert_eq!(
            got,
            [
                StepEvent::Data(Bytes::from(begin)),
                StepEvent::Nothing,
                StepEvent::Data(Bytes::from(vec![2; 100])),
            ]
        );
        // The tail (the END record) still waits for StepEnd.
        assert_eq!(dec.on_eof(), Err(TransferError::Truncated(462)));

        // A first chunk of another size, or a later chunk of that size, is held back as
        // usual: only the stream's first 312 bytes, alone, cannot end it.
        for sizes in [[BEGIN_CHUNK + 1, 10], [10, BEGIN_CHUNK]] {
            let mut dec = StepDecoder::new();
            let mut events = Vec::new();
            for n in sizes {
                let data = Bytes::from(vec![4; n]);
                let hash = *blake3::hash(&data).as_bytes();
                events.push(dec.on_frame(Frame::Data { hash, data }).unwrap());
            }
            assert_eq!(events[0], StepEvent::Nothing, "{sizes:?}");
            assert_eq!(events[1], StepEvent::Data(Bytes::from(vec![4; sizes[0]])));
        }
        // A corrupt BEGIN chunk is not released.
        let mut dec = StepDecoder::new();
        let data = Bytes::from(vec![5; BEGIN_CHUNK]);
        let hash = *blake3::hash(b"other").as_bytes();
        assert!(dec.on_frame(Frame::Data { hash, data }).is_err());
    }

    #[test]
    fn flipped_bit_in_chunk_is_caught_before_release() {
        let chunks = vec![b"first".to_vec(), b"secnd".to_vec(), b"third".to_vec()];
        let mut wire = sender_wire(&chunks);
        // Flip a bit in the payload of the third data frame.
        let third_payload = 2 * (crate::DATA_HEADER_LEN + 5) + crate::DATA_HEADER_LEN;
        wire[third_payload] ^= 0x01;
        let (out, r) = receiver_run(&wire, 64);
        assert!(r.unwrap_err().contains("failed its BLAKE3 check"));
        // Only the first chunk was released; the second (verified, held back) never is.
        assert_eq!(out, b"first");
    }

    #[test]
    fn dropped_chunk_fails_whole_stream_and_holds_back_tail() {
        // Build frames, then remove the middle data frame: each remaining chunk verifies,
        // but the length and stream hash do not.
        let chunks = vec![b"aaaa".to_vec(), b"bbbb".to_vec(), b"cccc".to_vec()];
        let wire = sender_wire(&chunks);
        let frame = crate::DATA_HEADER_LEN + 4;
        let mut cut = BytesMut::new();
        cut.put_slice(&wire[..frame]);
        cut.put_slice(&wire[2 * frame..]);
        let (out, r) = receiver_run(&cut, 1000);
        assert!(r.unwrap_err().contains("length mismatch"));
        assert_eq!(
            out, b"aaaa",
            "the held-back last chunk must not be released"
        );
    }

    #[test]
    fn abort_and_unexpected_frames() {
        let mut dec = StepDecoder::new();
        let e = dec
            .on_frame(Frame::Message(Message::StepAbort(StepAbort {
                reason: "zfs send died".into(),
            })))
            .unwrap_err();
        assert_eq!(e, TransferError::Aborted("zfs send died".into()));
        let mut dec = StepDecoder::new();
        let e = dec
            .on_frame(Frame::Message(Message::StepEnd(StepEncoder::new().end())))
            .unwrap();
        assert_eq!(
            e,
            StepEvent::Complete {
                last: None,
                total_len: 0
            }
        );
        assert!(matches!(
            dec.on_frame(Frame::Message(Message::StepEnd(StepEnd {
                total_len: 0,
                hash: [0; 32]
            }))),
            Err(TransferError::Unexpected { .. })
        ));
    }

    proptest! {
        /// Any split of the wire into network reads yields exactly the sent bytes.
        #[test]
        fn any_fragmentation_round_trips(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..10),
            piece in 1usize..200,
        ) {
            let (out, r) = receiver_run(&sender_wire(&chunks), piece);
            prop_assert_eq!(r, Ok(chunks.iter().map(|c| c.len() as u64).sum()));
            prop_assert_eq!(out, chunks.concat());
        }

        /// Truncating the wire anywhere never completes and never releases the final chunk.
        #[test]
        fn truncation_never_completes(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..6),
            frac in 0.0f64..1.0,
        ) {
            let wire = sender_wire(&chunks);
            let cut = ((wire.len() as f64) * frac) as usize;
            let (out, r) = receiver_run(&wire[..cut], 7);
            prop_assert!(r.is_err());
            let all = chunks.concat();
            let last = chunks.last().map(|c| c.len()).unwrap_or(0);
            prop_assert!(out.len() <= all.len() - last);
            prop_assert_eq!(&out[..], &all[..out.len()]);
        }

        /// A single flipped bit anywhere in the data frames is always detected.
        #[test]
        fn any_bit_flip_is_detected(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..6),
            pos in any::<usize>(),
            bit in 0u8..8,
        ) {
            let mut wire = sender_wire(&chunks);
            let data_len: usize = chunks.iter().map(|c| c.len() + crate::DATA_HEADER_LEN).sum();
            let i = pos % data_len;
            wire[i] ^= 1 << bit;
            let (out, r) = receiver_run(&wire, 50);
            prop_assert!(r.is_err());
            let all = chunks.concat();
            prop_assert_eq!(&out[..], &all[..out.len()]);
        }
    }
}
