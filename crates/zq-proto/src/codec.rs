//! Frame codec: `u32` big-endian body length, one kind byte, then the body.
//!
//! Kind `0x01` carries a bincode-encoded [`Message`]; kind `0x02` carries a data chunk as a
//! 32-byte BLAKE3 hash followed by the raw bytes, so data is never re-serialized and can be
//! split out of the receive buffer without a copy. Kind `0x03` carries a zstd-compressed
//! chunk: the hash (of the original bytes), their length as a big-endian `u32`, then one
//! zstd frame; only sent where the session agreed on `zstd`. Every length is checked
//! against [`MAX_FRAME_LEN`] before anything is reserved.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::limits::{MAX_CHUNK_LEN, MAX_FRAME_LEN};
use crate::message::{LimitError, Message};

const KIND_MESSAGE: u8 = 0x01;
const KIND_DATA: u8 = 0x02;
const KIND_ZSTD_DATA: u8 = 0x03;
const HASH_LEN: usize = 32;

/// Bytes in front of a data chunk's payload: length prefix, kind byte and hash.
pub const DATA_HEADER_LEN: usize = 4 + 1 + HASH_LEN;

/// Bytes in front of a compressed chunk's payload: as [`DATA_HEADER_LEN`], plus the
/// original length.
pub const ZSTD_DATA_HEADER_LEN: usize = DATA_HEADER_LEN + 4;

/// bincode configuration of every message: standard (varint, little endian), with a byte
/// limit so that a claimed collection length can never reserve more than a frame holds.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A protocol message.
    Message(Message),
    /// A chunk of send-stream bytes with the BLAKE3 hash its sender computed.
    Data {
        /// BLAKE3 of `data`, as claimed by the sender (checked by [`crate::StepDecoder`]).
        hash: [u8; 32],
        /// The bytes.
        data: Bytes,
    },
    /// A zstd-compressed chunk of send-stream bytes.
    Compressed {
        /// BLAKE3 of the original bytes, as claimed by the sender.
        hash: [u8; 32],
        /// Length of the original bytes (at most [`MAX_CHUNK_LEN`]): decompression never
        /// produces more.
        raw_len: u32,
        /// One zstd frame.
        data: Bytes,
    },
}

impl Frame {
    /// Short name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Message(m) => m.name(),
            Frame::Data { .. } => "Data",
            Frame::Compressed { .. } => "Compressed",
        }
    }
}

/// A frame could not be decoded. The stream it came from cannot be trusted any further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is zero: every frame has at least a kind byte.
    #[error("empty frame (length prefix 0)")]
    Empty,
    /// The length prefix is above the hard maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    Oversized {
        /// Claimed body length.
        len: usize,
        /// [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// The kind byte is not one this version knows.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// A data frame too short to hold its hash, or with a payload above [`MAX_CHUNK_LEN`].
    #[error(
        "data frame with a payload of {0} bytes (must be 0..={MAX_CHUNK_LEN} after a 32-byte hash)"
    )]
    BadDataFrame(usize),
    /// A compressed data frame too short for its header, claiming more than
    /// [`MAX_CHUNK_LEN`] original bytes, or compressed to more than it claims.
    #[error("compressed data frame of {len} bytes claiming {raw_len} original bytes (at most {MAX_CHUNK_LEN}, and no fewer than the compressed bytes)")]
    BadCompressedFrame {
        /// Compressed payload length.
        len: usize,
        /// Claimed original length.
        raw_len: u64,
    },
    /// The message body is not a valid bincode `Message` (unknown variant, bad UTF-8,
    /// truncated field...).
    #[error("malformed message: {0}")]
    BadMessage(String),
    /// The message decoded but left bytes unread.
    #[error("message frame has {0} trailing bytes")]
    TrailingBytes(usize),
    /// A field of the message exceeds its limit.
    #[error("message over limits: {0}")]
    Limit(#[from] LimitError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({0} bytes of a partial frame)")]
    Truncated(usize),
}

/// Appends `msg` as one frame to `out`.
///
/// Fails only if the message encodes to more than [`MAX_FRAME_LEN`] (a bug or an oversized
/// listing on our side: the peer would reject it anyway).
pub fn encode(msg: &Message, out: &mut BytesMut) -> Result<(), FrameError> {
    msg.validate()?;
    let body = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| FrameError::BadMessage(e.to_string()))?;
    let len = body.len() + 1;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::Oversized {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out.reserve(4 + len);
    out.put_u32(len as u32);
    out.put_u8(KIND_MESSAGE);
    out.put_slice(&body);
    Ok(())
}

/// The bytes that precede a data chunk of `len` bytes whose BLAKE3 is `hash`. Writing this
/// header and then the chunk itself produces one data frame without copying the chunk.
///
/// # Panics
/// If `len > MAX_CHUNK_LEN`: chunkers in this workspace never produce such a chunk.
pub fn encode_data_header(hash: &[u8; 32], len: usize) -> [u8; DATA_HEADER_LEN] {
    assert!(
        len <= MAX_CHUNK_LEN,
        "chunk of {len} bytes over MAX_CHUNK_LEN"
    );
    let mut h = [0u8; DATA_HEADER_LEN];
    h[..4].copy_from_slice(&((1 + HASH_LEN + len) as u32).to_be_bytes());
    h[4] = KIND_DATA;
    h[5..].copy_from_slice(hash);
    h
}

/// The bytes that precede a compressed chunk of `len` bytes whose original `raw_len` bytes
/// hash to `hash` (see [`encode_data_header`]).
///
/// # Panics
/// If `len > raw_len` or `raw_len > MAX_CHUNK_LEN`: a compressed chunk is only sent when it
/// is smaller than the chunk.
pub fn encode_zstd_header(
    hash: &[u8; 32],
    raw_len: usize,
    len: usize,
) -> [u8; ZSTD_DATA_HEADER_LEN] {
    assert!(
        len <= raw_len && raw_len <= MAX_CHUNK_LEN,
        "compressed chunk of {len} bytes for {raw_len}"
    );
    let mut h = [0u8; ZSTD_DATA_HEADER_LEN];
    h[..4].copy_from_slice(&((1 + HASH_LEN + 4 + len) as u32).to_be_bytes());
    h[4] = KIND_ZSTD_DATA;
    h[5..5 + HASH_LEN].copy_from_slice(hash);
    h[5 + HASH_LEN..].copy_from_slice(&(raw_len as u32).to_be_bytes());
    h
}

/// Decodes one frame from the front of `buf`, removing its bytes.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame; the caller reads more and
/// calls again. At end of stream, a non-empty `buf` is [`FrameError::Truncated`] (see
/// [`finish`]).
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_LEN {
        return Err(FrameError::Oversized {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if buf.len() < 4 + len {
        // Reserve the rest of this (bounded) frame so that reads land in place.
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let mut body = buf.split_to(len);
    let kind = body.get_u8();
    match kind {
        KIND_MESSAGE => {
            let (msg, used): (Message, usize) = bincode::serde::decode_from_slice(&body, config())
                .map_err(|e| FrameError::BadMessage(e.to_string()))?;
            if used != body.len() {
                return Err(FrameError::TrailingBytes(body.len() - used));
            }
            msg.validate()?;
            Ok(Some(Frame::Message(msg)))
        }
        KIND_DATA => {
            if body.len() < HASH_LEN || body.len() - HASH_LEN > MAX_CHUNK_LEN {
                return Err(FrameError::BadDataFrame(
                    body.len().saturating_sub(HASH_LEN),
                ));
            }
            let mut hash = [0u8; HASH_LEN];
            body.copy_to_slice(&mut hash);
            Ok(Some(Frame::Data {
                hash,
                data: body.freeze(),
            }))
        }
        KIND_ZSTD_DATA => {
            let bad = |raw_len| FrameError::BadCompressedFrame {
                len: body.len().saturating_sub(HASH_LEN + 4),
                raw_len,
            };
            if body.len() < HASH_LEN + 4 {
                return Err(bad(0));
            }
            let raw_len = u32::from_be_bytes([
                body[HASH_LEN],
                body[HASH_LEN + 1],
                body[HASH_LEN + 2],
                body[HASH_LEN + 3],
            ]);
            if raw_len as usize > MAX_CHUNK_LEN || body.len() - HASH_LEN - 4 > raw_len as usize {
                return Err(bad(u64::from(raw_len)));
            }
            let mut hash = [0u8; HASH_LEN];
            body.copy_to_slice(&mut hash);
            body.advance(4);
            Ok(Some(Frame::Compressed {
                hash,
                raw_len,
                data: body.freeze(),
            }))
        }
        other => Err(FrameError::UnknownKind(other)),
    }
}

/// Called at end of stream: leftover bytes mean the peer stopped inside a frame.
pub fn finish(buf: &BytesMut) -> Result<(), FrameError> {
    if buf.is_empty() {
        Ok(())
    } else {
        Err(FrameError::Truncated(buf.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_STRIPES;
    use crate::message::*;
    use proptest::prelude::*;

    fn frame_of(msg: &Message) -> BytesMut {
        let mut b = BytesMut::new();
        encode(msg, &mut b).unwrap();
        b
    }

    fn sample_header() -> Message {
        Message::StepHeader(StepHeader {
            source: "tank/home".into(),
            target: "backup/a/home".into(),
            from: Some(SnapRef {
                name: "s1".into(),
                guid: 1,
            }),
            to: SnapRef {
                name: "s2".into(),
                guid: u64::MAX,
            },
            intermediates: true,
            force: ForceAction::None,
            compression: "none".into(),
        })
    }

    #[test]
    fn message_round_trip() {
        let m = sample_header();
        let mut b = frame_of(&m);
        assert_eq!(decode(&mut b).unwrap(), Some(Frame::Message(m)));
        assert!(b.is_empty());
    }

    #[test]
    fn data_round_trip_without_copying_payload() {
        let data = Bytes::from_static(b"zfs stream bytes");
        let hash = *blake3::hash(&data).as_bytes();
        let mut b = BytesMut::new();
        b.put_slice(&encode_data_header(&hash, data.len()));
        b.put_slice(&data);
        assert_eq!(decode(&mut b).unwrap(), Some(Frame::Data { hash, data }));
    }

    /// Golden bytes: the wire layout documented in docs/protocol.md. A failure here means
    /// the wire format changed: bump the protocol version and update the document.
    #[test]
    fn wire_layout_is_stable() {
        let f = frame_of(&Message::StepEnd(StepEnd {
            total_len: 300,
            hash: [0xaa; 32],
        }));
        let mut want = vec![0, 0, 0, 37, KIND_MESSAGE, 6, 251, 0x2c, 0x01];
        want.extend_from_slice(&[0xaa; 32]);
        assert_eq!(&f[..], &want[..]);

        let f = frame_of(&Message::Hello(Hello {
            magic: crate::limits::MAGIC,
            min_version: 1,
            max_version: 1,
            compression: vec!["none".into()],
            checksums: vec!["blake3".into()],
            resume: vec![],
            software: "x".into(),
        }));
        let body: &[u8] = &[
            KIND_MESSAGE,
            0,
            b'Z',
            b'Q',
            0,
            0,
            1,
            1,
            1,
            4,
            b'n',
            b'o',
            b'n',
            b'e',
            1,
            6,
            b'b',
            b'l',
            b'a',
            b'k',
            b'e',
            b'3',
            0,
            1,
            b'x',
        ];
        assert_eq!(&f[4..], body);
        assert_eq!(&f[..4], &(body.len() as u32).to_be_bytes());
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let full = frame_of(&sample_header());
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            assert_eq!(decode(&mut b).unwrap(), None, "cut at {cut}");
            assert_eq!(finish(&b).is_err(), cut > 0);
        }
    }

    #[test]
    fn oversized_length_prefix_is_rejected_before_allocation() {
        let mut b = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        let cap_before = b.capacity();
        assert_eq!(
            decode(&mut b),
            Err(FrameError::Oversized {
                len: u32::MAX as usize,
                max: MAX_FRAME_LEN
            })
        );
        assert_eq!(b.capacity(), cap_before);
    }

    #[test]
    fn empty_frame_and_unknown_kind() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(decode(&mut b), Err(FrameError::Empty));
        let mut b = BytesMut::from(&[0u8, 0, 0, 1, 0x7f][..]);
        assert_eq!(decode(&mut b), Err(FrameError::UnknownKind(0x7f)));
    }

    #[test]
    fn stripe_counts_and_indexes_are_bounded() {
        for bad in [
            Message::Stripes(Stripes { id: 1, count: 0 }),
            Message::Stripes(Stripes {
                id: 1,
                count: MAX_STRIPES as u8 + 1,
            }),
            Message::StripeJoin(StripeJoin {
                id: 1,
                index: MAX_STRIPES as u8,
            }),
        ] {
            assert!(matches!(bad.validate(), Err(LimitError { .. })), "{bad:?}");
        }
    }

    #[test]
    fn unknown_message_variant_is_an_error() {
        // Variant index 200 does not exist in this version.
        let mut b = BytesMut::from(&[0u8, 0, 0, 3, KIND_MESSAGE, 0xfb, 200][..]);
        assert!(matches!(decode(&mut b), Err(FrameError::BadMessage(_))));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut f = frame_of(&Message::StepEnd(StepEnd {
            total_len: 1,
            hash: [0; 32],
        }));
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) + 1;
        f[..4].copy_from_slice(&len.to_be_bytes());
        f.put_u8(0);
        assert_eq!(decode(&mut f), Err(FrameError::TrailingBytes(1)));
    }

    #[test]
    fn short_data_frame_is_an_error() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 5, KIND_DATA, 1, 2, 3, 4][..]);
        assert_eq!(decode(&mut b), Err(FrameError::BadDataFrame(0)));
    }

    #[test]
    fn compressed_frames_claim_bounded_lengths() {
        let frame = |raw_len: u32, payload: usize| {
            let mut b = BytesMut::new();
            b.put_u32((1 + HASH_LEN + 4 + payload) as u32);
            b.put_u8(KIND_ZSTD_DATA);
            b.put_slice(&[7; HASH_LEN]);
            b.put_u32(raw_len);
            b.put_slice(&vec![0; payload]);
            b
        };
        let ok = decode(&mut frame(1000, 10)).unwrap().unwrap();
        assert!(
            matches!(ok, Frame::Compressed { raw_len: 1000, ref data, .. } if data.len() == 10)
        );
        let too_big = MAX_CHUNK_LEN as u32 + 1;
        assert_eq!(
            decode(&mut frame(too_big, 10)),
            Err(FrameError::BadCompressedFrame {
                len: 10,
                raw_len: u64::from(too_big)
            })
        );
        // Compressed to more than it claims: never sent by zq.
        assert!(matches!(
            decode(&mut frame(5, 10)),
            Err(FrameError::BadCompressedFrame { .. })
        ));
        // Too short for the original length.
        let mut b = BytesMut::from(&[0u8, 0, 0, 3, KIND_ZSTD_DATA, 1, 2][..]);
        assert!(matches!(
            decode(&mut b),
            Err(FrameError::BadCompressedFrame { .. })
        ));
        // The header helper writes what decode reads.
        let mut b = BytesMut::from(&encode_zstd_header(&[9; 32], 4096, 3)[..]);
        b.put_slice(b"abc");
        assert_eq!(
            decode(&mut b).unwrap(),
            Some(Frame::Compressed {
                hash: [9; 32],
                raw_len: 4096,
                data: Bytes::from_static(b"abc")
            })
        );
    }

    #[test]
    fn claimed_huge_vec_does_not_allocate() {
        // A ListRequest claiming u64::MAX roots in a tiny frame.
        let mut body = vec![KIND_MESSAGE, 3];
        body.extend_from_slice(&[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let mut b = BytesMut::new();
        b.put_u32(body.len() as u32);
        b.put_slice(&body);
        assert!(matches!(decode(&mut b), Err(FrameError::BadMessage(_))));
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-z0-9_.:-]{1,40}"
    }

    fn arb_snapref() -> impl Strategy<Value = SnapRef> {
        (arb_name(), any::<u64>()).prop_map(|(name, guid)| SnapRef { name, guid })
    }

    fn arb_wire_error() -> impl Strategy<Value = WireError> {
        (
            prop_oneof![
                Just(ErrorKind::NotAuthorized),
                Just(ErrorKind::Diverged),
                Just(ErrorKind::Zfs),
                Just(ErrorKind::Checksum)
            ],
            ".{0,200}",
            proptest::option::of(arb_snapref()),
        )
            .prop_map(|(kind, message, receiver_newest)| WireError {
                kind,
                message,
                receiver_newest,
            })
    }

    fn arb_snapshot_info() -> impl Strategy<Value = SnapshotInfo> {
        (arb_name(), any::<u64>(), any::<u64>()).prop_map(|(name, guid, createtxg)| SnapshotInfo {
            name,
            guid,
            createtxg,
        })
    }

    fn arb_header() -> impl Strategy<Value = StepHeader> {
        (
            arb_name(),
            arb_name(),
            proptest::option::of(arb_snapref()),
            arb_snapref(),
            any::<bool>(),
            prop_oneof![
                Just(ForceAction::None),
                Just(ForceAction::Replace),
                arb_snapref().prop_map(ForceAction::RollbackTo)
            ],
        )
            .prop_map(
                |(source, target, from, to, intermediates, force)| StepHeader {
                    source,
                    target,
                    from,
                    to,
                    intermediates,
                    force,
                    compression: "none".into(),
                },
            )
    }

    fn arb_list_request() -> impl Strategy<Value = ListRequest> {
        proptest::collection::vec((arb_name(), any::<bool>()), 0..5).prop_map(|r| ListRequest {
            roots: r
                .into_iter()
                .map(|(dataset, recursive)| ListRoot { dataset, recursive })
                .collect(),
        })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let caps = proptest::collection::vec("[a-z0-9-]{1,10}", 0..4);
        prop_oneof![
            (
                any::<u16>(),
                any::<u16>(),
                caps.clone(),
                caps.clone(),
                caps,
                ".{0,30}"
            )
                .prop_map(
                    |(min_version, max_version, compression, checksums, resume, software)| {
                        Message::Hello(Hello {
                            magic: crate::limits::MAGIC,
                            min_version,
                            max_version,
                            compression,
                            checksums,
                            resume,
                            software,
                        })
                    }
                ),
            (any::<u16>(), arb_name(), ".{0,30}").prop_map(|(version, c, software)| {
                Message::Welcome(Welcome {
                    version,
                    compression: c.clone(),
                    checksum: c,
                    resume: vec![],
                    software,
                })
            }),
            arb_list_request().prop_map(Message::ListRequest),
            proptest::collection::vec(
                (
                    arb_name(),
                    proptest::collection::vec(arb_snapshot_info(), 0..5)
                ),
                0..5
            )
            .prop_map(|d| Message::ListResponse(ListResponse {
                datasets: d
                    .into_iter()
                    .map(|(name, snapshots)| DatasetSnapshots { name, snapshots })
                    .collect()
            })),
            arb_header().prop_map(Message::StepHeader),
            (
                arb_header(),
                "(zq_[a-z0-9_]{0,20})?",
                any::<bool>(),
                proptest::option::of((any::<u64>(), any::<[u8; 32]>()))
            )
                .prop_map(|(header, last_tag, hold_last, resume)| Message::StepStart(
                    StepStart {
                        header,
                        last_tag,
                        hold_last,
                        resume: resume.map(|(offset, prefix_hash)| ResumeAt {
                            offset,
                            prefix_hash
                        }),
                    }
                )),
            proptest::collection::vec(
                (
                    arb_name(),
                    any::<Option<u64>>(),
                    arb_snapref(),
                    any::<bool>(),
                    any::<u64>(),
                    any::<[u8; 32]>()
                ),
                0..4
            )
            .prop_map(|tokens| Message::Resumable(Resumable {
                tokens: tokens
                    .into_iter()
                    .map(
                        |(dataset, from_guid, to, intermediates, offset, prefix_hash)| {
                            ResumeToken {
                                dataset,
                                from_guid,
                                to,
                                intermediates,
                                offset,
                                prefix_hash,
                            }
                        }
                    )
                    .collect()
            })),
            (any::<u64>(), any::<[u8; 32]>())
                .prop_map(|(total_len, hash)| Message::StepEnd(StepEnd { total_len, hash })),
            ".{0,100}".prop_map(|reason| Message::StepAbort(StepAbort { reason })),
            (
                arb_name(),
                any::<u64>(),
                proptest::collection::vec(arb_snapshot_info(), 0..5)
            )
                .prop_map(|(dataset, guid, snapshots)| {
                    Message::Verdict(Verdict::Committed(Committed {
                        dataset,
                        guid,
                        snapshots,
                    }))
                }),
            arb_wire_error().prop_map(|e| Message::Verdict(Verdict::Failed(e))),
            arb_wire_error().prop_map(Message::Error),
            (
                prop_oneof![
                    Just(RefusalReason::VersionMismatch),
                    Just(RefusalReason::NoCommonCapability),
                    Just(RefusalReason::BadHello),
                ],
                any::<u16>(),
                any::<u16>(),
                ".{0,100}"
            )
                .prop_map(|(reason, min_version, max_version, message)| {
                    Message::Refused(Refusal {
                        reason,
                        min_version,
                        max_version,
                        message,
                    })
                }),
            (arb_name(), any::<u32>(), any::<u64>()).prop_map(|(dataset, keep_last, base_guid)| {
                Message::Prune(PruneRequest {
                    dataset,
                    keep_last,
                    base_guid,
                })
            }),
            (
                proptest::collection::vec(arb_name(), 0..5),
                any::<Option<u32>>()
            )
                .prop_map(|(destroyed, remaining)| Message::Pruned(Pruned {
                    destroyed,
                    remaining
                })),
            (
                arb_name(),
                any::<Option<u32>>(),
                proptest::option::of("[0-9a-z=,]{0,40}"),
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(|(dataset, keep_last, grid, base_guid, dry_run)| {
                    Message::PruneBy(PruneBy {
                        dataset,
                        keep_last,
                        grid,
                        base_guid,
                        dry_run,
                    })
                }),
            (any::<u64>(), 1..=MAX_STRIPES as u8)
                .prop_map(|(id, count)| Message::Stripes(Stripes { id, count })),
            (any::<u64>(), 0..MAX_STRIPES as u8)
                .prop_map(|(id, index)| Message::StripeJoin(StripeJoin { id, index })),
            any::<u64>().prop_map(Message::StripeChunk),
            (
                proptest::collection::vec("[a-z_]{1,20}", 0..5),
                any::<bool>(),
                proptest::collection::vec(arb_name(), 0..3)
            )
                .prop_map(|(features, require_raw, encrypted)| Message::Destination(
                    Destination {
                        features,
                        require_raw,
                        encrypted
                    }
                )),
            proptest::collection::vec((arb_name(), "[0-9a-f-]{0,40}"), 0..3).prop_map(|p| {
                Message::PartialReceives(PartialReceives {
                    partial: p
                        .into_iter()
                        .map(|(dataset, token)| PartialReceive { dataset, token })
                        .collect(),
                })
            }),
            (
                arb_header(),
                proptest::option::of("[0-9a-f-]{0,40}"),
                any::<bool>()
            )
                .prop_map(|(header, resume_token, discard_partial)| {
                    Message::StepBegin(Box::new(StepBegin {
                        start: StepStart {
                            header,
                            last_tag: String::new(),
                            hold_last: false,
                            resume: None,
                        },
                        resume_token,
                        discard_partial,
                    }))
                }),
            (
                arb_header(),
                any::<bool>(),
                proptest::collection::vec(("[a-z:.]{1,20}", "[ -~]{0,40}"), 0..3),
                proptest::collection::vec("[a-z:.]{1,20}", 0..3)
            )
                .prop_map(|(header, carried, set, exclude)| {
                    Message::StepWith(Box::new(StepWith {
                        begin: StepBegin {
                            start: StepStart {
                                header,
                                last_tag: String::new(),
                                hold_last: false,
                                resume: None,
                            },
                            resume_token: None,
                            discard_partial: false,
                        },
                        properties: StepProperties {
                            carried,
                            set,
                            exclude,
                        },
                    }))
                }),
            arb_list_request().prop_map(Message::ListNewest),
        ]
    }

    /// The strategy generates every kind of message: a new variant does not compile here
    /// until it is added below, and fails this test until `arb_message` generates it.
    #[test]
    fn the_strategy_covers_every_message_kind() {
        use proptest::strategy::ValueTree;
        fn kind(m: &Message) -> usize {
            match m {
                Message::Hello(_) => 0,
                Message::Welcome(_) => 1,
                Message::Refused(_) => 2,
                Message::ListRequest(_) => 3,
                Message::ListResponse(_) => 4,
                Message::StepHeader(_) => 5,
                Message::StepEnd(_) => 6,
                Message::StepAbort(_) => 7,
                Message::Verdict(_) => 8,
                Message::Error(_) => 9,
                Message::Prune(_) => 10,
                Message::Pruned(_) => 11,
                Message::Resumable(_) => 12,
                Message::StepStart(_) => 13,
                Message::PruneBy(_) => 14,
                Message::Stripes(_) => 15,
                Message::StripeJoin(_) => 16,
                Message::StripeChunk(_) => 17,
                Message::Destination(_) => 18,
                Message::PartialReceives(_) => 19,
                Message::StepBegin(_) => 20,
                Message::StepWith(_) => 21,
                Message::ListNewest(_) => 22,
            }
        }
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut seen = [false; 23];
        for _ in 0..2000 {
            let m = arb_message().new_tree(&mut runner).unwrap().current();
            seen[kind(&m)] = true;
        }
        assert!(seen.iter().all(|s| *s), "kinds generated: {seen:?}");
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msgs in proptest::collection::vec(arb_message(), 1..8)) {
            let mut b = BytesMut::new();
            for m in &msgs {
                encode(m, &mut b).unwrap();
            }
            for m in msgs {
                prop_assert_eq!(decode(&mut b).unwrap(), Some(Frame::Message(m)));
            }
            prop_assert!(b.is_empty());
        }

        #[test]
        fn truncated_message_never_decodes(m in arb_message(), cut_frac in 0.0f64..1.0) {
            let full = frame_of(&m);
            let cut = ((full.len() as f64) * cut_frac) as usize;
            let mut b = BytesMut::from(&full[..cut]);
            prop_assert_eq!(decode(&mut b).unwrap(), None);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut b) {}
        }

        #[test]
        fn corrupted_body_never_panics(m in arb_message(), pos in any::<usize>(), bit in 0u8..8) {
            let mut f = frame_of(&m);
            let i = 5 + pos % (f.len() - 5);
            f[i] ^= 1 << bit;
            let _ = decode(&mut f);
        }
    }
}
