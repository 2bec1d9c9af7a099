//! The first record of a `zfs send` stream (DRR_BEGIN): which snapshot the stream creates
//! and which one it needs, read from the bytes themselves.
//!
//! Both sides use it so that a replication step needs no `zfs` call besides `send` and
//! `receive`: the sender learns the GUID of a snapshot it just created from its own stream,
//! and the receiver checks the stream against the step's header before `zfs receive` sees
//! a byte. The layout (`dmu_replay_record_t`, 312 bytes) has not changed since the first
//! ZFS release; zfs-fuse and OpenZFS 2.x write the same one, in the sender's byte order:
//!
//! | offset | field |
//! | --- | --- |
//! | 0 | `drr_type: u32` (0 = DRR_BEGIN) |
//! | 4 | `drr_payloadlen: u32` |
//! | 8 | `drr_magic: u64` (0x2F5BACBAC; byte-swapped in a stream of the other byte order) |
//! | 16 | `drr_versioninfo: u64` (low 2 bits: 1 substream, 2 compound; feature flags above) |
//! | 24 | `drr_creation_time: u64` |
//! | 32 | `drr_type: u32` (objset type), 36 `drr_flags: u32` |
//! | 40 | `drr_toguid: u64` |
//! | 48 | `drr_fromguid: u64` (0 for a full stream) |
//! | 56 | `drr_toname: [u8; 256]` (NUL-terminated `pool/fs@snap`) |

/// Length of the BEGIN record, the first bytes of every stream (and of every record).
pub const BEGIN_RECORD_LEN: usize = 312;

/// The most bytes [`first_snapshot`] waits for: a compound stream's header carries an
/// nvlist (empty for OpenZFS's `-I`, a few KiB per snapshot with properties) before the
/// first snapshot's BEGIN record.
pub const MAX_COMPOUND_HEADER: usize = 16 << 20;

/// Stream feature flags zq looks at (`DMU_BACKUP_FEATURE_*` in OpenZFS's `zfs_ioctl.h`),
/// as [`StreamBegin::features`] holds them.
pub mod feature {
    /// `zfs send -e`: small blocks embedded in block pointers.
    pub const EMBED_DATA: u64 = 1 << 16;
    /// LZ4-compressed blocks (with `-c`, `-e` or `-w`).
    pub const LZ4: u64 = 1 << 17;
    /// `zfs send -L`: blocks larger than 128 KiB.
    pub const LARGE_BLOCKS: u64 = 1 << 19;
    /// `zfs send -t`: a resumed stream.
    pub const RESUMING: u64 = 1 << 20;
    /// `zfs send -c`: blocks as compressed on disk.
    pub const COMPRESSED: u64 = 1 << 22;
    /// `zfs send -w` of an encrypted dataset: blocks as encrypted on disk, no key needed to
    /// receive them.
    pub const RAW: u64 = 1 << 24;
    /// zstd-compressed blocks (with `-c` or `-w`).
    pub const ZSTD: u64 = 1 << 25;
}

/// `DMU_BACKUP_MAGIC`.
const MAGIC: u64 = 0x2_F5BA_CBAC;

/// What the BEGIN record says about a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamBegin {
    /// GUID of the snapshot the stream creates (0 in a compound stream's first record).
    pub to_guid: u64,
    /// GUID of the snapshot it must be applied on; `None` for a full stream.
    pub from_guid: Option<u64>,
    /// `pool/fs@snap` as named on the sending side.
    pub to_name: String,
    /// A compound stream (`zfs send -I` or `-R`), whose first record describes the package
    /// (no GUIDs; the name of the last snapshot) rather than one snapshot.
    pub compound: bool,
    /// Feature flags ([`feature`]); a compound stream's first record carries few of them,
    /// its snapshots' records ([`first_snapshot`]) the rest.
    pub features: u64,
    /// Bytes of payload after the record (a compound stream's nvlist, a raw stream's keys).
    pub payload_len: u32,
}

impl StreamBegin {
    /// A raw send of an encrypted dataset: the blocks stay encrypted, and receiving them
    /// needs no key.
    pub fn is_raw(&self) -> bool {
        self.features & feature::RAW != 0
    }
}

/// What the first bytes of a stream say about its first snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstSnapshot {
    /// The BEGIN record of the stream's first snapshot: the stream's own, or in a compound
    /// stream the first substream's.
    Begin(StreamBegin),
    /// That record ends this many bytes into the stream: read that much first.
    NeedBytes(usize),
}

/// Finds the BEGIN record of the first snapshot a stream carries: its first record, or in
/// a compound stream (header record, nvlist payload, END record, then one substream per
/// snapshot) the first substream's. OpenZFS writes the feature flags that matter (raw,
/// compressed) only there.
pub fn first_snapshot(bytes: &[u8]) -> Result<FirstSnapshot, BeginError> {
    if bytes.len() < BEGIN_RECORD_LEN {
        return Ok(FirstSnapshot::NeedBytes(BEGIN_RECORD_LEN));
    }
    let outer = parse_begin(bytes)?;
    if !outer.compound {
        return Ok(FirstSnapshot::Begin(outer));
    }
    let end_at = BEGIN_RECORD_LEN + outer.payload_len as usize;
    let begin_at = end_at + BEGIN_RECORD_LEN;
    let need = begin_at + BEGIN_RECORD_LEN;
    if need > MAX_COMPOUND_HEADER {
        return Err(BeginError::HeaderTooLarge(need));
    }
    if bytes.len() < need {
        return Ok(FirstSnapshot::NeedBytes(need));
    }
    let big_endian = u64_at(bytes, 8, false) != MAGIC;
    let end = u32_at(bytes, end_at, big_endian);
    if end != DRR_END {
        return Err(BeginError::NoEnd(end));
    }
    let inner = parse_begin(&bytes[begin_at..])?;
    if inner.compound {
        return Err(BeginError::Nested);
    }
    Ok(FirstSnapshot::Begin(inner))
}

/// `DRR_END`, the record type that closes a compound stream's header.
const DRR_END: u32 = 5;

/// The bytes are not the start of a `zfs send` stream zq can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BeginError {
    /// Fewer bytes than one BEGIN record.
    #[error("a zfs send stream starts with a {BEGIN_RECORD_LEN}-byte BEGIN record; only {0} bytes arrived")]
    TooShort(usize),
    /// The magic number is wrong in both byte orders.
    #[error("not a zfs send stream (magic {0:#x})")]
    BadMagic(u64),
    /// The first record is not a BEGIN record.
    #[error("a zfs send stream must start with a BEGIN record, not record type {0}")]
    NotBegin(u32),
    /// A compound stream's header does not end with an END record.
    #[error(
        "a compound zfs send stream's header must end with an END record, not record type {0}"
    )]
    NoEnd(u32),
    /// A compound stream's first substream is itself compound.
    #[error("a compound zfs send stream nested in another")]
    Nested,
    /// A compound stream's header is larger than zq reads before the first snapshot.
    #[error(
        "a compound zfs send stream's header of {0} bytes (zq reads at most {MAX_COMPOUND_HEADER})"
    )]
    HeaderTooLarge(usize),
}

/// Parses the BEGIN record at the start of `bytes` (which may hold more of the stream).
pub fn parse_begin(bytes: &[u8]) -> Result<StreamBegin, BeginError> {
    let rec = bytes
        .get(..BEGIN_RECORD_LEN)
        .ok_or(BeginError::TooShort(bytes.len()))?;
    let le_magic = u64_at(rec, 8, false);
    let big_endian = match le_magic {
        MAGIC => false,
        m if m.swap_bytes() == MAGIC => true,
        m => return Err(BeginError::BadMagic(m)),
    };
    let record_type = u32_at(rec, 0, big_endian);
    if record_type != 0 {
        return Err(BeginError::NotBegin(record_type));
    }
    let versioninfo = u64_at(rec, 16, big_endian);
    let from = u64_at(rec, 48, big_endian);
    let name = &rec[56..];
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
    Ok(StreamBegin {
        to_guid: u64_at(rec, 40, big_endian),
        from_guid: (from != 0).then_some(from),
        to_name: String::from_utf8_lossy(name).into_owned(),
        compound: versioninfo & 0x3 == 2,
        // DMU_GET_FEATUREFLAGS: 56 bits above the header type.
        features: (versioninfo >> 2) & ((1 << 56) - 1),
        payload_len: u32_at(rec, 4, big_endian),
    })
}

fn u64_at(rec: &[u8], at: usize, big_endian: bool) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&rec[at..at + 8]);
    if big_endian {
        u64::from_be_bytes(b)
    } else {
        u64::from_le_bytes(b)
    }
}

fn u32_at(rec: &[u8], at: usize, big_endian: bool) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&rec[at..at + 4]);
    if big_endian {
        u32::from_be_bytes(b)
    } else {
        u32::from_le_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    // Captured on zfs-fuse 0.7.0 (pool v23): `zfs send [-i|-I] zqma/fs@s1 ...`, where the
    // snapshots' GUIDs were read with `zfs get -Hp guid`.
    const S1: u64 = 10299075463925339385;
    const S2: u64 = 11386937075674283587;

    #[rstest]
    #[case::full(&include_bytes!("../tests/fixtures/zfs-fuse-send-full.zs")[..], S1, None, "zqma/fs@s1", false)]
    #[case::incremental(&include_bytes!("../tests/fixtures/zfs-fuse-send-i.zs")[..], S2, Some(S1), "zqma/fs@s2", false)]
    // -I s1..s4 is a compound stream: a BEGIN record with no GUIDs that names the last
    // snapshot, an END record, then one substream per snapshot.
    #[case::intermediates(&include_bytes!("../tests/fixtures/zfs-fuse-send-I.zs")[..], 0, None, "zqma/fs@s4", true)]
    fn captured_zfs_fuse_streams(
        #[case] stream: &[u8],
        #[case] to: u64,
        #[case] from: Option<u64>,
        #[case] name: &str,
        #[case] compound: bool,
    ) {
        let b = parse_begin(stream).unwrap();
        assert_eq!(
            (b.to_guid, b.from_guid, b.to_name.as_str()),
            (to, from, name)
        );
        assert_eq!(b.compound, compound);
    }

    // Captured on OpenZFS 2.3.2 by tests/fixtures/capture (GUIDs in send-guids.out).
    const O1: u64 = 14576262304944577222;
    const O2: u64 = 2427830275231608639;

    #[rstest]
    #[case::full(&include_bytes!("../tests/fixtures/openzfs-2.3/send-full.zs")[..], O1, None, "zqcap/home@s1", false)]
    #[case::incremental(&include_bytes!("../tests/fixtures/openzfs-2.3/send-i.zs")[..], O2, Some(O1), "zqcap/home@s2", false)]
    // OpenZFS's -I s1..zq_… (three snapshots) is a compound stream too.
    #[case::intermediates(&include_bytes!("../tests/fixtures/openzfs-2.3/send-I.zs")[..], 0, None, "zqcap/home@zq_2026-11-21T10:00:00.000Z", true)]
    fn captured_openzfs_streams(
        #[case] stream: &[u8],
        #[case] to: u64,
        #[case] from: Option<u64>,
        #[case] name: &str,
        #[case] compound: bool,
    ) {
        captured_zfs_fuse_streams(stream, to, from, name, compound);
    }

    /// A BEGIN record as OpenZFS 2.x writes it: feature flags in `drr_versioninfo`
    /// (LARGE_BLOCKS | EMBED_DATA | LZ4 | SA_SPILL here), optionally big-endian.
    fn openzfs_begin(big_endian: bool, versioninfo: u64) -> Vec<u8> {
        let mut rec = vec![0u8; BEGIN_RECORD_LEN];
        let put64 = |rec: &mut Vec<u8>, at: usize, v: u64| {
            let b = if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            rec[at..at + 8].copy_from_slice(&b);
        };
        put64(&mut rec, 8, MAGIC);
        put64(&mut rec, 16, versioninfo);
        put64(&mut rec, 40, 42);
        put64(&mut rec, 48, 7);
        rec[56..56 + 13].copy_from_slice(b"tank/vm@zq_1\0");
        rec
    }

    #[rstest]
    #[case::little_endian(false)]
    #[case::big_endian(true)]
    fn openzfs_layout_with_feature_flags(#[case] big_endian: bool) {
        let features = (0x800 | 0x10000 | 0x20000 | 0x80000) << 2;
        let b = parse_begin(&openzfs_begin(big_endian, features | 1)).unwrap();
        assert_eq!((b.to_guid, b.from_guid), (42, Some(7)));
        assert_eq!(b.to_name, "tank/vm@zq_1");
        assert!(!b.compound);
        assert!(parse_begin(&openzfs_begin(big_endian, 2)).unwrap().compound);
    }

    // Captured on OpenZFS 2.3 by tests/fixtures/capture: raw sends of an encrypted dataset
    // (GUIDs in send-raw-guids.out) and a -c -L -e incremental.
    const R1: u64 = 5931166119328526990;
    const R2: u64 = 9865761113061733775;

    #[test]
    fn raw_streams_say_so_in_their_first_snapshot() {
        let full = include_bytes!("../tests/fixtures/openzfs-2.3/send-raw-full.zs");
        let FirstSnapshot::Begin(b) = first_snapshot(full).unwrap() else {
            panic!("a whole stream is enough")
        };
        assert!(b.is_raw() && b.features & feature::COMPRESSED != 0);
        assert_eq!((b.to_guid, b.from_guid), (R1, None));
        assert!(b.payload_len > 0, "a raw stream carries its keys' nvlist");

        // -I: the outer record is the package's and says nothing of raw; the first
        // substream (after the header's nvlist and END record) does.
        let compound = include_bytes!("../tests/fixtures/openzfs-2.3/send-raw-I.zs");
        let outer = parse_begin(compound).unwrap();
        assert!(outer.compound && !outer.is_raw());
        let need = match first_snapshot(&compound[..BEGIN_RECORD_LEN]).unwrap() {
            FirstSnapshot::NeedBytes(n) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(need, 3 * BEGIN_RECORD_LEN + outer.payload_len as usize);
        assert_eq!(
            first_snapshot(&compound[..need - 1]).unwrap(),
            FirstSnapshot::NeedBytes(need)
        );
        let FirstSnapshot::Begin(first) = first_snapshot(&compound[..need]).unwrap() else {
            panic!("enough bytes")
        };
        assert!(first.is_raw());
        assert_eq!((first.to_guid, first.from_guid), (R2, Some(R1)));

        let cle = include_bytes!("../tests/fixtures/openzfs-2.3/send-cLe-i.zs");
        let b = parse_begin(cle).unwrap();
        assert!(!b.is_raw());
        assert_ne!(b.features & feature::COMPRESSED, 0);
        assert_ne!(b.features & feature::EMBED_DATA, 0);
        // A plain stream has none of these.
        let plain = include_bytes!("../tests/fixtures/openzfs-2.3/send-i.zs");
        let p = parse_begin(plain).unwrap();
        assert_eq!(
            p.features & (feature::COMPRESSED | feature::EMBED_DATA | feature::RAW),
            0
        );
    }

    #[test]
    fn a_compound_header_must_end_and_be_bounded() {
        let compound = include_bytes!("../tests/fixtures/openzfs-2.3/send-raw-I.zs");
        let mut no_end = compound.to_vec();
        let end_at = BEGIN_RECORD_LEN + parse_begin(compound).unwrap().payload_len as usize;
        no_end[end_at] = 3;
        assert_eq!(first_snapshot(&no_end), Err(BeginError::NoEnd(3)));
        let mut huge = compound.to_vec();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            first_snapshot(&huge),
            Err(BeginError::HeaderTooLarge(_))
        ));
    }

    #[test]
    fn rejects_what_is_not_a_stream() {
        let good = include_bytes!("../tests/fixtures/zfs-fuse-send-i.zs");
        assert_eq!(parse_begin(&good[..100]), Err(BeginError::TooShort(100)));
        let mut bad = good.to_vec();
        bad[8] ^= 1;
        assert!(matches!(parse_begin(&bad), Err(BeginError::BadMagic(_))));
        let mut end = good.to_vec();
        end[0] = 2; // DRR_END
        assert_eq!(parse_begin(&end), Err(BeginError::NotBegin(2)));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_begin(&bytes);
            let _ = first_snapshot(&bytes);
        }

        #[test]
        fn a_compound_header_never_panics(
            payload_len in any::<u32>(),
            tail in proptest::collection::vec(any::<u8>(), 0..1200),
        ) {
            let mut s = include_bytes!("../tests/fixtures/openzfs-2.3/send-raw-I.zs")
                [..BEGIN_RECORD_LEN]
                .to_vec();
            s[4..8].copy_from_slice(&payload_len.to_le_bytes());
            s.extend(tail);
            let _ = first_snapshot(&s);
        }
    }
}
