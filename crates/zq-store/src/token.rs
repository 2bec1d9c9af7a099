//! OpenZFS's `receive_resume_token`: what an interrupted `zfs receive -s` kept, decoded
//! without running `zfs`, so that a sender can check that the token still continues the
//! step it wants (same snapshot GUIDs) before it runs `zfs send -t`.
//!
//! The token is `VERSION-CHECKSUM-PACKEDLEN-HEX` (`dsl_dataset.c`,
//! `get_receive_resume_token_impl`): `HEX` is a zlib-compressed nvlist in the kernel's
//! native encoding, `PACKEDLEN` its uncompressed size, `CHECKSUM` the first word of the
//! fletcher-4 of the compressed bytes (the sum of their little-endian 32-bit words),
//! checked here as zfs checks it. Tokens come from the peer: the length, charset and
//! sizes are bounded before anything is decoded, and the nvlist parser checks every
//! offset.

use std::io::Read;

/// The longest token zq accepts (a plain one is ~300 characters; redaction lists make
/// them longer).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The largest nvlist a token may unpack to.
const MAX_PACKED: usize = 64 * 1024;

/// What a resume token says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResumeToken {
    /// GUID of the incremental base; `None` for a full stream.
    pub from_guid: Option<u64>,
    /// GUID of the snapshot being received.
    pub to_guid: u64,
    /// `pool/fs@snap` as the sender named it.
    pub to_name: String,
    /// Stream bytes the receiver already has.
    pub bytes: u64,
    /// The stream was raw (`-w`).
    pub raw: bool,
    /// The stream carried compressed blocks (`-c`).
    pub compressed: bool,
    /// The stream carried embedded blocks (`-e`).
    pub embedded: bool,
    /// The stream carried large blocks (`-L`).
    pub large_blocks: bool,
}

/// A token zq cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("receive_resume_token: {0}")]
pub struct TokenError(String);

fn bad(why: impl Into<String>) -> TokenError {
    TokenError(why.into())
}

/// Checks a token's length and charset (what may reach a `zfs send -t` argv): digits,
/// `a-f` and `-` only.
pub fn check(token: &str) -> Result<(), TokenError> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(bad(format!(
            "{} characters (1 to {MAX_TOKEN_LEN})",
            token.len()
        )));
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-')
    {
        return Err(bad("characters other than 0-9, a-f and -"));
    }
    Ok(())
}

/// Decodes `token`.
pub fn decode(token: &str) -> Result<ResumeToken, TokenError> {
    check(token)?;
    let mut parts = token.splitn(4, '-');
    let (Some(version), Some(checksum), Some(len), Some(hex)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not VERSION-CHECKSUM-LENGTH-DATA"));
    };
    if version != "1" {
        return Err(bad(format!("version {version}; zq reads version 1")));
    }
    let packed_len = usize::from_str_radix(len, 16)
        .ok()
        .filter(|&n| n <= MAX_PACKED)
        .ok_or_else(|| bad(format!("a packed length of {len:?} (hex, at most 64 KiB)")))?;
    if hex.len() % 2 != 0 {
        return Err(bad("odd number of hex digits"));
    }
    let compressed: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad("not hex"))?;
    // fletcher_4_native_varsize's first word: whole 32-bit words only (x86 byte order).
    let sum = compressed
        .chunks_exact(4)
        .map(|w| u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
        .fold(0u64, u64::wrapping_add);
    if u64::from_str_radix(checksum, 16).ok() != Some(sum) {
        return Err(bad(format!(
            "its checksum {checksum} does not match its data ({sum:x})"
        )));
    }
    let mut packed = Vec::with_capacity(packed_len);
    flate2::read::ZlibDecoder::new(compressed.as_slice())
        .take(packed_len as u64 + 1)
        .read_to_end(&mut packed)
        .map_err(|e| bad(format!("not zlib data: {e}")))?;
    if packed.len() != packed_len {
        return Err(bad(format!(
            "{} bytes unpacked, the token says {packed_len}",
            packed.len()
        )));
    }
    let mut t = ResumeToken::default();
    let mut to_guid = None;
    for (name, value) in nvlist_pairs(&packed)? {
        match (name, value) {
            ("fromguid", Value::U64(v)) => t.from_guid = Some(v).filter(|&g| g != 0),
            ("toguid", Value::U64(v)) => to_guid = Some(v),
            ("bytes", Value::U64(v)) => t.bytes = v,
            ("toname", Value::Str(s)) => t.to_name = s.to_string(),
            ("rawok", Value::Flag) => t.raw = true,
            ("compressok", Value::Flag) => t.compressed = true,
            ("embedok", Value::Flag) => t.embedded = true,
            ("largeblockok", Value::Flag) => t.large_blocks = true,
            _ => {}
        }
    }
    t.to_guid = to_guid.ok_or_else(|| bad("no toguid"))?;
    if t.to_name.is_empty() {
        return Err(bad("no toname"));
    }
    Ok(t)
}

/// An nvpair value zq reads.
enum Value<'a> {
    /// `DATA_TYPE_BOOLEAN`: present, no value.
    Flag,
    /// `DATA_TYPE_UINT64`.
    U64(u64),
    /// `DATA_TYPE_STRING`.
    Str(&'a str),
    /// Anything else.
    Other,
}

const DATA_TYPE_BOOLEAN: u32 = 1;
const DATA_TYPE_UINT64: u32 = 8;
const DATA_TYPE_STRING: u32 = 9;

/// The pairs of a natively encoded nvlist (`nvpair.c`, `nvs_native`): a 4-byte header
/// (encoding 0 = native, then the byte order: 1 = little-endian), version and flags (4
/// bytes each), then pairs, each `nvp_size: i32, nvp_name_sz: i16, reserve: i16,
/// value_elem: i32, type: i32`, the name (NUL-terminated, padded to 8), the value; a size
/// of 0 ends the list.
fn nvlist_pairs(b: &[u8]) -> Result<Vec<(&str, Value<'_>)>, TokenError> {
    let short = || bad("the nvlist ends early");
    let header = b.get(..4).ok_or_else(short)?;
    if header[0] != 0 {
        return Err(bad(format!(
            "nvlist encoding {} (zq reads native, 0)",
            header[0]
        )));
    }
    let little = header[1] == 1;
    let u32_at = |at: usize| -> Result<u32, TokenError> {
        let s: [u8; 4] = b
            .get(at..at + 4)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?;
        Ok(if little {
            u32::from_le_bytes(s)
        } else {
            u32::from_be_bytes(s)
        })
    };
    let u16_at = |at: usize| -> Result<u16, TokenError> {
        let s: [u8; 2] = b
            .get(at..at + 2)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?;
        Ok(if little {
            u16::from_le_bytes(s)
        } else {
            u16::from_be_bytes(s)
        })
    };
    let mut pairs = Vec::new();
    // Header, then nvl_version and nvl_nvflag.
    let mut at = 4 + 8;
    loop {
        let size = u32_at(at)? as usize;
        if size == 0 {
            return Ok(pairs);
        }
        let end = at.checked_add(size).filter(|&e| e <= b.len() && size >= 16);
        let end = end.ok_or_else(|| bad(format!("an nvpair of {size} bytes at {at}")))?;
        let name_sz = usize::from(u16_at(at + 4)?);
        let kind = u32_at(at + 12)?;
        let name_at = at + 16;
        let name = b
            .get(name_at..name_at + name_sz)
            .filter(|n| n.last() == Some(&0))
            .and_then(|n| std::str::from_utf8(&n[..n.len() - 1]).ok())
            .ok_or_else(|| bad("an nvpair name"))?;
        let value_at = name_at + name_sz.div_ceil(8) * 8;
        let value = match kind {
            DATA_TYPE_BOOLEAN => Value::Flag,
            DATA_TYPE_UINT64 => {
                let lo = u32_at(value_at)? as u64;
                let hi = u32_at(value_at + 4)? as u64;
                Value::U64(if little { hi << 32 | lo } else { lo << 32 | hi })
            }
            DATA_TYPE_STRING => {
                let raw = b.get(value_at..end).ok_or_else(short)?;
                let len = raw.iter().position(|&c| c == 0).ok_or_else(short)?;
                Value::Str(std::str::from_utf8(&raw[..len]).map_err(|_| bad("a string"))?)
            }
            _ => Value::Other,
        };
        if value_at > end {
            return Err(bad("an nvpair's value beyond its size"));
        }
        pairs.push((name, value));
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Captured on OpenZFS 2.3.2 by tests/fixtures/capture: an interrupted full receive -s,
    // and an interrupted raw incremental; `zfs send -nvt` says what each holds.
    const FULL: &str = include_str!("../tests/fixtures/openzfs-2.3/token-full.out");
    const RAW_I: &str = include_str!("../tests/fixtures/openzfs-2.3/token-raw-i.out");

    #[test]
    fn decodes_what_zfs_send_nvt_shows() {
        let full = decode(FULL.trim()).unwrap();
        assert_eq!(
            full,
            ResumeToken {
                from_guid: None,
                to_guid: 0x2325e2d8b6a43d36,
                to_name: "zqcap/home@s1".into(),
                bytes: 0xf20,
                ..Default::default()
            }
        );
        let raw = decode(RAW_I.trim()).unwrap();
        assert_eq!(
            raw,
            ResumeToken {
                from_guid: Some(0x31517d804777d621),
                to_guid: 0xb021c8c63ce0f273,
                to_name: "zqcap/secret@s2".into(),
                bytes: 0xb5c,
                raw: true,
                compressed: true,
                ..Default::default()
            }
        );
        // The listing carries them as they are.
        let listed = crate::parse::parse_list(include_str!(
            "../tests/fixtures/openzfs-2.3/list-with-tokens.out"
        ))
        .unwrap();
        let tokens: Vec<_> = listed
            .iter()
            .filter_map(|e| Some((e.name.as_str(), e.resume_token.as_deref()?)))
            .collect();
        assert_eq!(
            tokens,
            [
                ("zqcap/r/partial", FULL.trim()),
                ("zqcap/r/secret", RAW_I.trim())
            ]
        );
    }

    #[test]
    fn a_changed_token_does_not_decode_to_something_else() {
        let t = FULL.trim();
        // Any hex digit of the data changed: the checksum fails.
        for at in (t.len() - 60..t.len()).step_by(7) {
            let mut bytes = t.as_bytes().to_vec();
            bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
            let err = decode(std::str::from_utf8(&bytes).unwrap()).unwrap_err();
            assert!(err.to_string().contains("checksum"), "{err}");
        }
        // The length it claims.
        assert!(decode(&t.replacen("-b8-", "-b9-", 1)).is_err());
    }

    #[test]
    fn rejects_what_cannot_go_on_a_command_line() {
        assert!(check("1-abc-10-789c").is_ok());
        for bad in [
            "",
            "1-ab; rm -rf /",
            "1-AB",
            "-t",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rejects_malformed_tokens() {
        for t in [
            "1-0-10",
            "2-0-10-789c",
            "1-0-ffffff-789c",
            "1-0-10-789",
            "1-0-10-0000",
        ] {
            assert!(decode(t).is_err(), "{t}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "[0-9a-f-]{0,300}") {
            let _ = decode(&s);
        }

        #[test]
        fn an_nvlist_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = nvlist_pairs(&b);
        }
    }
}
