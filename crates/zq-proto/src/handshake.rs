//! Handshake: the sender offers a version range and capability names in a `Hello`; the
//! receiver picks the highest common version and one of each capability, answering
//! `Welcome`, or `Refused` with the reason. Pure functions; the net layer moves the frames.

use crate::limits::{MAGIC, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use crate::message::{Hello, Refusal, RefusalReason, Welcome, COMPRESSION_NONE, COMPRESSION_ZSTD};
use crate::transfer::StreamDigest;

/// What one side can do, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Lowest protocol version spoken.
    pub min_version: u16,
    /// Highest protocol version spoken.
    pub max_version: u16,
    /// Compression names, preferred first. `"none"` is always understood.
    pub compression: Vec<String>,
    /// Checksum names, preferred first. At least one must be common.
    pub checksums: Vec<String>,
    /// Resume kinds.
    pub resume: Vec<String>,
    /// For logs, e.g. `zq-send 0.1.0`.
    pub software: String,
}

impl Capabilities {
    /// What this build supports.
    pub fn current(software: impl Into<String>) -> Self {
        Capabilities {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            compression: vec![COMPRESSION_ZSTD.into(), COMPRESSION_NONE.into()],
            checksums: StreamDigest::NAMES.map(String::from).to_vec(),
            resume: vec![
                crate::message::RESUME_ZFS_TOKEN.into(),
                crate::message::RESUME_SPOOL.into(),
            ],
            software: software.into(),
        }
    }

    /// The `Hello` a sender with these capabilities opens with.
    pub fn hello(&self) -> Hello {
        Hello {
            magic: MAGIC,
            min_version: self.min_version,
            max_version: self.max_version,
            compression: self.compression.clone(),
            checksums: self.checksums.clone(),
            resume: self.resume.clone(),
            software: self.software.clone(),
        }
    }

    /// Receiver side: answer a sender's `Hello`.
    pub fn accept(&self, hello: &Hello) -> Result<Welcome, Refusal> {
        let refuse = |reason, message: String| Refusal {
            reason,
            min_version: self.min_version,
            max_version: self.max_version,
            message,
        };
        if hello.magic != MAGIC {
            return Err(refuse(
                RefusalReason::BadHello,
                format!("bad magic {:02x?}: not a zq sender", hello.magic),
            ));
        }
        let lo = hello.min_version.max(self.min_version);
        let hi = hello.max_version.min(self.max_version);
        if lo > hi || hello.min_version > hello.max_version {
            return Err(refuse(
                RefusalReason::VersionMismatch,
                format!(
                    "protocol version mismatch: sender {} speaks {}..={}, receiver {} speaks {}..={}",
                    hello.software,
                    hello.min_version,
                    hello.max_version,
                    self.software,
                    self.min_version,
                    self.max_version
                ),
            ));
        }
        let Some(checksum) = first_common(&hello.checksums, &self.checksums) else {
            return Err(refuse(
                RefusalReason::NoCommonCapability,
                format!(
                    "no common checksum: sender offers {:?}, receiver supports {:?}",
                    hello.checksums, self.checksums
                ),
            ));
        };
        let compression = first_common(&hello.compression, &self.compression)
            .unwrap_or_else(|| COMPRESSION_NONE.into());
        let resume = hello
            .resume
            .iter()
            .filter(|r| self.resume.contains(r))
            .cloned()
            .collect();
        Ok(Welcome {
            version: hi,
            compression,
            checksum,
            resume,
            software: self.software.clone(),
        })
    }

    /// Sender side: check that a `Welcome` only picked what we offered.
    pub fn check_welcome(&self, w: &Welcome) -> Result<Session, HandshakeError> {
        if w.version < self.min_version || w.version > self.max_version {
            return Err(HandshakeError::BadWelcome(format!(
                "receiver chose version {} outside our range {}..={}",
                w.version, self.min_version, self.max_version
            )));
        }
        if !self.checksums.contains(&w.checksum) {
            return Err(HandshakeError::BadWelcome(format!(
                "receiver chose checksum {:?} that we did not offer",
                w.checksum
            )));
        }
        if w.compression != COMPRESSION_NONE && !self.compression.contains(&w.compression) {
            return Err(HandshakeError::BadWelcome(format!(
                "receiver chose compression {:?} that we did not offer",
                w.compression
            )));
        }
        Ok(Session {
            version: w.version,
            compression: w.compression.clone(),
            checksum: w.checksum.clone(),
            resume: w.resume.clone(),
            peer_software: w.software.clone(),
        })
    }
}

fn first_common(preferred: &[String], supported: &[String]) -> Option<String> {
    preferred.iter().find(|c| supported.contains(c)).cloned()
}

/// What a completed handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Protocol version in use.
    pub version: u16,
    /// Compression the sender uses for data chunks.
    pub compression: String,
    /// Checksum in use.
    pub checksum: String,
    /// Resume kinds both sides support.
    pub resume: Vec<String>,
    /// The peer's software string, for logs.
    pub peer_software: String,
}

impl Session {
    /// How `StepEnd` hashes the whole stream in this session. The checksum was checked
    /// against our offer, which holds only names [`StreamDigest`] knows.
    pub fn stream_digest(&self) -> StreamDigest {
        StreamDigest::from_checksum(&self.checksum).unwrap_or(StreamDigest::Flat)
    }

    /// Whether the sender may compress chunks with zstd in this session.
    pub fn zstd(&self) -> bool {
        self.compression == COMPRESSION_ZSTD
    }
}

/// A handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The receiver refused us.
    #[error("receiver refused the handshake ({:?}): {}", .0.reason, .0.message)]
    Refused(Refusal),
    /// The receiver's `Welcome` picked something we did not offer.
    #[error("invalid Welcome from receiver: {0}")]
    BadWelcome(String),
    /// The peer sent something other than the expected handshake message.
    #[error("expected {expected}, peer sent {got}")]
    Unexpected {
        /// What we waited for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(min: u16, max: u16) -> Capabilities {
        Capabilities {
            min_version: min,
            max_version: max,
            ..Capabilities::current("test")
        }
    }

    #[test]
    fn same_build_agrees() {
        let c = Capabilities::current("zq");
        let w = c.accept(&c.hello()).unwrap();
        let s = c.check_welcome(&w).unwrap();
        assert_eq!(s.version, PROTOCOL_VERSION_MAX);
        assert_eq!(s.checksum, "blake3-chunks");
        assert_eq!(s.stream_digest(), StreamDigest::Chunks);
        assert_eq!(s.compression, "zstd");
        // A peer from before blake3-chunks hashes every byte twice; both sides then do.
        let old = Capabilities {
            checksums: vec!["blake3".into()],
            ..Capabilities::current("zq-send 0.1")
        };
        let w = c.accept(&old.hello()).unwrap();
        assert_eq!(
            old.check_welcome(&w).unwrap().stream_digest(),
            StreamDigest::Flat
        );
        let w = old.accept(&c.hello()).unwrap();
        assert_eq!(
            c.check_welcome(&w).unwrap().stream_digest(),
            StreamDigest::Flat
        );
        // A sender that does not compress offers only "none".
        let plain = Capabilities {
            compression: vec!["none".into()],
            ..Capabilities::current("zq-send")
        };
        assert_eq!(c.accept(&plain.hello()).unwrap().compression, "none");
    }

    #[test]
    fn highest_common_version_wins() {
        let w = caps(1, 5).accept(&caps(3, 9).hello()).unwrap();
        assert_eq!(w.version, 5);
    }

    #[test]
    fn disjoint_versions_are_refused_with_both_ranges() {
        let r = caps(1, 1).accept(&caps(7, 9).hello()).unwrap_err();
        assert_eq!(r.reason, RefusalReason::VersionMismatch);
        assert!(r.message.contains("7..=9"), "{}", r.message);
        assert!(r.message.contains("1..=1"), "{}", r.message);
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut h = caps(1, 1).hello();
        h.magic = *b"SSH-";
        assert_eq!(
            caps(1, 1).accept(&h).unwrap_err().reason,
            RefusalReason::BadHello
        );
    }

    #[test]
    fn unknown_capabilities_are_ignored_and_no_checksum_refused() {
        let mut h = caps(1, 1).hello();
        h.compression = vec!["lz5000".into(), "none".into()];
        h.resume = vec!["teleport".into()];
        let w = caps(1, 1).accept(&h).unwrap();
        assert_eq!(w.compression, "none");
        assert!(w.resume.is_empty());
        h.checksums = vec!["crc1".into()];
        assert_eq!(
            caps(1, 1).accept(&h).unwrap_err().reason,
            RefusalReason::NoCommonCapability
        );
    }

    #[test]
    fn welcome_outside_offer_is_rejected() {
        let c = caps(1, 2);
        let mut w = c.accept(&c.hello()).unwrap();
        w.version = 3;
        assert!(c.check_welcome(&w).is_err());
        let mut w = c.accept(&c.hello()).unwrap();
        w.checksum = "md5".into();
        assert!(c.check_welcome(&w).is_err());
    }
}
