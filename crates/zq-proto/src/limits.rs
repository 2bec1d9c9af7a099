//! Hard limits every decoder checks before it allocates, and the protocol version range.

/// Protocol versions this build speaks, inclusive. Any change to a message layout bumps
/// [`PROTOCOL_VERSION_MAX`]; the handshake messages themselves never change layout.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// See [`PROTOCOL_VERSION_MIN`]. Version 2 (same layouts): a step header may leave the GUID
/// of its `to` snapshot to the stream (0), and `Prune`/`Pruned` exist.
/// Version 3: steps start with `StepStart` (protection, resume), `Resumable` follows a
/// listing when both peers offered the `spool` resume kind, `ErrorKind::ResumeRejected`.
/// Version 4: `PruneBy` (retention by a time grid as well as by count, and dry runs).
/// Version 5: `Stripes`, `StripeJoin`, `StripeChunk` (a bulk step's chunks spread over
/// parallel connections).
/// Version 6: `Destination` ends every listing (the destination's pool features, encrypted
/// datasets, and whether it takes only raw streams).
/// Version 7: `PartialReceives` ends every listing, steps start with `StepBegin` (native
/// resume with `zfs send -t`, and discarding a partial receive).
/// Version 8: `StepWith`, a `StepBegin` with properties: the stream carries the source's
/// (`zfs send -p`), and the sender asks the receiver to set or exclude some.
/// Version 9: `ListNewest`, a listing of each dataset's newest snapshot only.
pub const PROTOCOL_VERSION_MAX: u16 = 9;

/// First four bytes of every `Hello`: "ZQ" and two bytes of zeros, so a stray client of
/// another protocol is told apart from a zq peer of another version.
pub const MAGIC: [u8; 4] = *b"ZQ\0\0";

/// Largest payload of one data chunk (the `zfs send` bytes in one frame).
pub const MAX_CHUNK_LEN: usize = 1024 * 1024;

/// Largest frame body (kind byte + payload) a decoder accepts. A length prefix above this
/// is rejected before any buffer is reserved.
pub const MAX_FRAME_LEN: usize = 2 * 1024 * 1024;

/// Longest dataset or snapshot name carried in a message (ZFS's own limit is 255 bytes).
pub const MAX_NAME_LEN: usize = 255;

/// Most datasets in one listing request or response.
pub const MAX_LIST_DATASETS: usize = 65_536;

/// Most snapshots reported for one dataset in a listing response.
pub const MAX_SNAPSHOTS_PER_DATASET: usize = 1_000_000;

/// Longest free-text field (error messages, software versions).
pub const MAX_TEXT_LEN: usize = 16 * 1024;
/// Longest time grid in a `PruneBy` (16 rules fit in well under this).
pub const MAX_GRID_LEN: usize = 1024;

/// Most capability names a peer may advertise per kind, and the longest such name.
pub const MAX_CAPABILITIES: usize = 32;
/// See [`MAX_CAPABILITIES`].
pub const MAX_CAPABILITY_LEN: usize = 64;

/// Most pool feature names in a `Destination` (OpenZFS 2.3 has 45).
pub const MAX_POOL_FEATURES: usize = 256;

/// Longest `receive_resume_token` carried (a plain one is ~300 bytes).
pub const MAX_RESUME_TOKEN_LEN: usize = 8 * 1024;

/// Longest user-hold tag a sender may ask the receiver to place (ZFS allows 255 bytes).
pub const MAX_TAG_LEN: usize = 128;

/// Most properties a step may ask the receiver to set, and to exclude.
pub const MAX_STEP_PROPERTIES: usize = 64;

/// Longest property value a step may ask to set (zfs allows 8 KiB for user properties;
/// zq-recv's own `--force-property` takes 1 KiB).
pub const MAX_PROPERTY_VALUE_LEN: usize = 1024;

/// Most stripe streams one step's chunks may be spread over (`zq-send --connections`).
pub const MAX_STRIPES: usize = 16;
