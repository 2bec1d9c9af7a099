//! The zq wire protocol: messages, the frame codec and the handshake and transfer state
//! machines. No I/O, no async runtime, no QUIC: bytes in, events out (the quinn-proto
//! habit), so every rule here is tested with in-memory peers.
//!
//! A zq connection carries one handshake stream and then one bidirectional stream per
//! request (a snapshot listing or one replication step). Every stream is a sequence of
//! [`Frame`]s; see `docs/protocol.md` for the byte layout and the rules.

#![forbid(unsafe_code)]
// Data from a peer or from zfs must not panic the process (tests may unwrap).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod codec;
pub mod handshake;
pub mod limits;
pub mod message;
pub mod transfer;

pub use codec::{
    decode, encode, encode_data_header, encode_zstd_header, Frame, FrameError, DATA_HEADER_LEN,
    ZSTD_DATA_HEADER_LEN,
};
pub use handshake::{Capabilities, HandshakeError, Session};
pub use message::*;
pub use transfer::{
    Compression, Compressor, Payload, StepDecoder, StepEncoder, StepEvent, StreamDigest,
    TransferError, AUTO_LEVEL, BEGIN_CHUNK,
};
