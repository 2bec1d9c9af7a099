//! Which `zfs send` options a step uses (`-w`, `-c`, `-L`, `-e`): from the job's choices,
//! what the source pool uses, and what the destination said it can receive (protocol
//! version 6, [`zq_proto::Destination`]). Nothing is guessed: an option goes only where
//! both sides are known to handle it, and an encrypted dataset is never sent as plaintext
//! unless the job says so.
//!
//! Why each rule (OpenZFS `dmu_send.c`, `dmu_recv.c`):
//! - A receiving pool refuses a stream that carries LZ4, zstd, embedded or large blocks
//!   without the matching feature enabled; `-c` and `-e` carry LZ4/zstd blocks where the
//!   source pool uses them, `-L` large blocks where the dataset has some.
//! - `-w` of an encrypted dataset keeps its blocks encrypted (and compressed, and large):
//!   the receiver needs the `encryption` feature and never the key.
//! - An embedded-data stream cannot be received into an encrypted dataset (EINVAL).

use std::collections::BTreeSet;

use zq_store::{DatasetName, PoolFeatures, SendFlags};

/// How a job sends an encrypted dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encrypted {
    /// Raw (`zfs send -w`): the blocks stay encrypted; the receiving host needs no key.
    #[default]
    Raw,
    /// Decrypted (plain `zfs send`): the receiver gets plaintext, and encrypts it only if
    /// it receives under an encrypted dataset whose key it has. A dataset replicated this
    /// way cannot later take raw incrementals.
    Decrypt,
}

impl std::str::FromStr for Encrypted {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Encrypted::Raw),
            "decrypt" => Ok(Encrypted::Decrypt),
            other => Err(format!("{other:?} is not raw or decrypt")),
        }
    }
}

/// A job's choices of `zfs send` options; each is used only where both pools allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendPolicy {
    /// How encrypted datasets go.
    pub encrypted: Encrypted,
    /// `-c` for unencrypted datasets (encrypted ones are compressed as part of `-w`).
    pub compressed: bool,
    /// `-L`.
    pub large_blocks: bool,
    /// `-e`, except into an encrypted destination.
    pub embedded: bool,
}

impl Default for SendPolicy {
    fn default() -> Self {
        SendPolicy {
            encrypted: Encrypted::Raw,
            compressed: true,
            large_blocks: true,
            embedded: true,
        }
    }
}

/// What a destination said it can receive (its [`zq_proto::Destination`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationFacts {
    /// Pool features enabled on the destination.
    pub features: BTreeSet<String>,
    /// It refuses anything but raw streams of encrypted datasets.
    pub require_raw: bool,
    /// Encrypted datasets there (and the encrypted nearest ancestor of a missing root).
    pub encrypted: BTreeSet<String>,
    /// The datasets the listing named (they exist).
    pub listed: BTreeSet<String>,
}

impl DestinationFacts {
    /// From a listing's [`zq_proto::Destination`] and its datasets.
    pub fn new(d: zq_proto::Destination, listed: &[zq_proto::DatasetSnapshots]) -> Self {
        DestinationFacts {
            features: d.features.into_iter().collect(),
            require_raw: d.require_raw,
            encrypted: d.encrypted.into_iter().collect(),
            listed: listed.iter().map(|l| l.name.clone()).collect(),
        }
    }

    /// Whether a dataset received at `target` without `-w` is (or would be) encrypted:
    /// the target if it exists, else the nearest existing ancestor decides.
    pub fn encrypts(&self, target: &DatasetName) -> bool {
        let mut at = Some(target.clone());
        while let Some(ds) = at {
            if self.encrypted.contains(ds.as_str()) {
                return true;
            }
            if self.listed.contains(ds.as_str()) {
                return false;
            }
            at = ds.parent();
        }
        false
    }

    fn has(&self, feature: &str) -> bool {
        self.features.contains(feature)
    }
}

/// The source side of a step.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The dataset is encrypted.
    pub encrypted: bool,
    /// Its pool's features.
    pub features: &'a PoolFeatures,
    /// The local zfs has `-w -c -L -e` at all (not zfs-fuse).
    pub capable: bool,
}

/// Why a dataset is not sent at all: the job's choices and the destination exclude every
/// way. Not transient; the message names what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The options for a step of `source` into `target`. `dest` is `None` when the receiver
/// did not say what it can receive (a receiver before protocol version 6): then only a
/// plain stream goes, and an encrypted dataset only with [`Encrypted::Decrypt`].
pub fn choose(
    policy: &SendPolicy,
    source: Source<'_>,
    dest: Option<&DestinationFacts>,
    target: &DatasetName,
) -> Result<SendFlags, Refused> {
    let decrypt = SendFlags {
        decrypt: true,
        ..SendFlags::default()
    };
    let Some(dest) = dest else {
        return match (source.encrypted, policy.encrypted) {
            (false, _) => Ok(SendFlags::default()),
            (true, Encrypted::Decrypt) => Ok(decrypt),
            (true, Encrypted::Raw) => Err(Refused(format!(
                "the source is encrypted and is sent raw, but the receiver (protocol before \
                 version 6, or a ZFS without feature flags) does not say whether it can \
                 receive raw streams into {target}: upgrade zq-recv, or allow plaintext with \
                 --encrypted decrypt"
            ))),
        };
    };
    if dest.require_raw && !(source.encrypted && policy.encrypted == Encrypted::Raw) {
        let why = if source.encrypted {
            "the job sends it decrypted (--encrypted decrypt)"
        } else {
            "it is not encrypted"
        };
        return Err(Refused(format!(
            "the receiver takes only raw sends of encrypted datasets (zq-recv \
             --require-encrypted), and {why}: leave it out of the job, or encrypt it at the \
             source"
        )));
    }
    // Blocks as the source pool stores them: every compression in use must be known there.
    let missing_compression: Vec<&str> = ["lz4_compress", "zstd_compress"]
        .into_iter()
        .filter(|f| source.features.active.contains(*f) && !dest.has(f))
        .collect();
    let large_ok = !source.features.active.contains("large_blocks") || dest.has("large_blocks");
    if source.encrypted && policy.encrypted == Encrypted::Raw {
        let mut missing: Vec<&str> = Vec::new();
        if !source.capable {
            return Err(Refused(
                "the source is encrypted, and this zfs cannot send raw streams".into(),
            ));
        }
        if !dest.has("encryption") {
            missing.push("encryption");
        }
        missing.extend(&missing_compression);
        if !large_ok {
            missing.push("large_blocks");
        }
        if !missing.is_empty() {
            return Err(Refused(format!(
                "the source is encrypted and is sent raw, but the destination pool of \
                 {target} lacks the feature{} {} (zpool set feature@NAME=enabled there), or \
                 allow plaintext with --encrypted decrypt",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", ")
            )));
        }
        return Ok(SendFlags {
            raw: true,
            ..SendFlags::default()
        });
    }
    if !source.capable {
        return Ok(if source.encrypted {
            decrypt
        } else {
            SendFlags::default()
        });
    }
    let compression_ok = missing_compression.is_empty();
    Ok(SendFlags {
        raw: false,
        compressed: policy.compressed && compression_ok,
        large_blocks: policy.large_blocks && dest.has("large_blocks"),
        embedded: policy.embedded
            && compression_ok
            && dest.has("embedded_data")
            && !dest.encrypts(target),
        decrypt: source.encrypted,
        properties: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(enabled: &[&str], active: &[&str]) -> PoolFeatures {
        PoolFeatures {
            enabled: enabled
                .iter()
                .chain(active)
                .map(|s| s.to_string())
                .collect(),
            active: active.iter().map(|s| s.to_string()).collect(),
        }
    }

    const ALL: &[&str] = &[
        "encryption",
        "lz4_compress",
        "zstd_compress",
        "large_blocks",
        "embedded_data",
    ];

    fn dest(enabled: &[&str]) -> DestinationFacts {
        DestinationFacts {
            features: enabled.iter().map(|s| s.to_string()).collect(),
            listed: ["back".to_string()].into(),
            ..Default::default()
        }
    }

    fn name(s: &str) -> DatasetName {
        DatasetName::parse(s).unwrap()
    }

    fn src(encrypted: bool, f: &PoolFeatures) -> Source<'_> {
        Source {
            encrypted,
            features: f,
            capable: true,
        }
    }

    #[test]
    fn openzfs_to_openzfs_sends_raw_or_compressed() {
        let f = features(&[], &["lz4_compress", "embedded_data"]);
        let p = SendPolicy::default();
        let d = dest(ALL);
        let t = name("back/fs");
        let enc = choose(&p, src(true, &f), Some(&d), &t).unwrap();
        assert_eq!(enc.to_string(), "-w");
        let plain = choose(&p, src(false, &f), Some(&d), &t).unwrap();
        assert_eq!(plain.to_string(), "-c -L -e");
        assert!(!plain.decrypt);
    }

    #[test]
    fn an_encrypted_dataset_goes_plain_only_when_the_job_says_so() {
        let f = features(&[], &["lz4_compress"]);
        let t = name("back/fs");
        // A receiver that does not say what it takes.
        let err = choose(&SendPolicy::default(), src(true, &f), None, &t).unwrap_err();
        assert!(err.0.contains("--encrypted decrypt"), "{err}");
        // A destination pool without encryption.
        let d = dest(&["lz4_compress", "large_blocks"]);
        let err = choose(&SendPolicy::default(), src(true, &f), Some(&d), &t).unwrap_err();
        assert!(err.0.contains("lacks the feature encryption"), "{err}");
        let p = SendPolicy {
            encrypted: Encrypted::Decrypt,
            ..SendPolicy::default()
        };
        let flags = choose(&p, src(true, &f), Some(&d), &t).unwrap();
        assert!(flags.decrypt && !flags.raw);
        assert!(choose(&p, src(true, &f), None, &t).unwrap().decrypt);
    }

    #[test]
    fn features_the_destination_lacks_are_not_used() {
        let f = features(&[], &["lz4_compress", "zstd_compress", "large_blocks"]);
        let t = name("back/fs");
        // No zstd there: blocks go decompressed, and -e (which carries compressed blocks)
        // neither.
        let d = dest(&[
            "lz4_compress",
            "large_blocks",
            "embedded_data",
            "encryption",
        ]);
        let flags = choose(&SendPolicy::default(), src(false, &f), Some(&d), &t).unwrap();
        assert_eq!(flags.to_string(), "-L");
        let err = choose(&SendPolicy::default(), src(true, &f), Some(&d), &t).unwrap_err();
        assert!(err.0.contains("zstd_compress"), "{err}");
        // zfs-fuse as the destination: no features at all.
        let flags = choose(&SendPolicy::default(), src(false, &f), Some(&dest(&[])), &t).unwrap();
        assert_eq!(flags.to_string(), "plain");
    }

    #[test]
    fn no_embedded_data_into_an_encrypted_destination() {
        let f = features(&[], &["lz4_compress", "embedded_data"]);
        let mut d = dest(ALL);
        d.encrypted.insert("back/secret".into());
        d.listed.insert("back/secret".into());
        d.listed.insert("back/secret/open".into());
        let p = SendPolicy::default();
        // A new dataset under an encrypted one inherits its encryption.
        let new = choose(&p, src(false, &f), Some(&d), &name("back/secret/new/x")).unwrap();
        assert_eq!(new.to_string(), "-c -L");
        // An existing unencrypted dataset under it stays so.
        let open = choose(&p, src(false, &f), Some(&d), &name("back/secret/open")).unwrap();
        assert_eq!(open.to_string(), "-c -L -e");
        // The nearest ancestor of a missing root, outside the listing.
        let mut above = dest(ALL);
        above.listed.clear();
        above.encrypted.insert("vault".into());
        let under = choose(&p, src(false, &f), Some(&above), &name("vault/a/b")).unwrap();
        assert!(!under.embedded);
    }

    #[test]
    fn a_receiver_that_requires_raw_gets_nothing_else() {
        let f = features(&[], &["lz4_compress"]);
        let mut d = dest(ALL);
        d.require_raw = true;
        let t = name("back/fs");
        assert!(
            choose(&SendPolicy::default(), src(true, &f), Some(&d), &t)
                .unwrap()
                .raw
        );
        let err = choose(&SendPolicy::default(), src(false, &f), Some(&d), &t).unwrap_err();
        assert!(err.0.contains("it is not encrypted"), "{err}");
        let p = SendPolicy {
            encrypted: Encrypted::Decrypt,
            ..SendPolicy::default()
        };
        let err = choose(&p, src(true, &f), Some(&d), &t).unwrap_err();
        assert!(err.0.contains("decrypted"), "{err}");
    }

    #[test]
    fn each_option_can_be_turned_off() {
        let f = features(&[], &["lz4_compress", "embedded_data"]);
        let p = SendPolicy {
            compressed: false,
            large_blocks: false,
            embedded: false,
            ..SendPolicy::default()
        };
        let flags = choose(&p, src(false, &f), Some(&dest(ALL)), &name("back/fs")).unwrap();
        assert_eq!(flags.to_string(), "plain");
    }
}
