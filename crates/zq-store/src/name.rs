//! Dataset and snapshot names, validated by ZFS's naming rules before they reach argv.
//!
//! zq follows `zfs_namecheck.c` with one deliberate restriction: dataset names may not
//! contain spaces (ZFS allows them), so that every dataset name is safe in logs, configs,
//! `--allow` rules and scripts. Snapshot names keep ZFS's full character set, spaces
//! included, because zq must replicate snapshots that other tools created. No valid name
//! can start with `-`, so none can be mistaken for an option.

use std::fmt;

/// ZFS's `ZFS_MAX_DATASET_NAME_LEN` is 256 including the terminating NUL.
pub const MAX_NAME_LEN: usize = 255;

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} name {name:?}: {reason}")]
pub struct NameError {
    /// `"dataset"` or `"snapshot"`.
    pub what: &'static str,
    /// The rejected input (debug-escaped when printed).
    pub name: String,
    /// The rule it broke.
    pub reason: String,
}

fn err(what: &'static str, name: &str, reason: impl Into<String>) -> NameError {
    NameError {
        what,
        name: name.to_string(),
        reason: reason.into(),
    }
}

fn dataset_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')
}

fn snapshot_char(c: char) -> bool {
    dataset_char(c) || c == ' '
}

/// A validated dataset (filesystem or volume) name such as `tank/home`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DatasetName(String);

impl DatasetName {
    /// Validates `s` as a dataset name.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let what = "dataset";
        if s.is_empty() {
            return Err(err(what, s, "empty"));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(err(
                what,
                s,
                format!("{} bytes, the limit is {MAX_NAME_LEN}", s.len()),
            ));
        }
        if let Some(c) = s.chars().find(|&c| c == '@' || c == '#' || c == '%') {
            return Err(err(
                what,
                s,
                format!("'{c}' is not allowed in a dataset name"),
            ));
        }
        if s.starts_with('/') {
            return Err(err(what, s, "leading '/' (dataset names are not paths)"));
        }
        if s.ends_with('/') {
            return Err(err(what, s, "trailing '/'"));
        }
        for component in s.split('/') {
            if component.is_empty() {
                return Err(err(what, s, "empty component ('//')"));
            }
            if component == "." || component == ".." {
                return Err(err(what, s, format!("'{component}' component")));
            }
            if let Some(c) = component.chars().find(|&c| !dataset_char(c)) {
                return Err(err(
                    what,
                    s,
                    format!("character {c:?} (allowed: letters, digits, '_', '-', '.', ':')"),
                ));
            }
        }
        let pool = s.split('/').next().unwrap_or_default();
        if !pool.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(err(what, s, "the pool name must begin with a letter"));
        }
        if pool == "mirror"
            || pool == "log"
            || pool.starts_with("raidz")
            || pool.starts_with("draid")
            || pool.starts_with("spare")
        {
            return Err(err(what, s, format!("'{pool}' is a reserved pool name")));
        }
        Ok(DatasetName(s.to_string()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The pool, i.e. the first component.
    pub fn pool(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }

    /// The parent dataset, or `None` for a pool's root dataset.
    pub fn parent(&self) -> Option<DatasetName> {
        self.0
            .rsplit_once('/')
            .map(|(p, _)| DatasetName(p.to_string()))
    }

    /// Number of components (`tank` is 1, `tank/a/b` is 3).
    pub fn depth(&self) -> usize {
        self.0.split('/').count()
    }

    /// True if `self` is `root` or a descendant of it.
    pub fn is_within(&self, root: &DatasetName) -> bool {
        self.0 == root.0
            || (self.0.len() > root.0.len()
                && self.0.starts_with(&root.0)
                && self.0.as_bytes()[root.0.len()] == b'/')
    }

    /// Maps `self`, which must be within `from`, to the same relative place under `to`:
    /// `tank/home/a` rebased from `tank/home` to `backup/h` is `backup/h/a`.
    pub fn rebase(&self, from: &DatasetName, to: &DatasetName) -> Result<DatasetName, NameError> {
        if !self.is_within(from) {
            return Err(err(
                "dataset",
                &self.0,
                format!("not within {}", from.as_str()),
            ));
        }
        let rest = &self.0[from.0.len()..];
        DatasetName::parse(&format!("{}{}", to.0, rest))
    }

    /// The snapshot `self@snap`, validated.
    pub fn snapshot(&self, snap: &str) -> Result<SnapshotName, NameError> {
        SnapshotName::new(self.clone(), snap)
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DatasetName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DatasetName::parse(s)
    }
}

/// A validated snapshot name `dataset@snap`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotName {
    dataset: DatasetName,
    snap: String,
}

impl SnapshotName {
    /// Validates the part after `@` and the total length.
    pub fn new(dataset: DatasetName, snap: &str) -> Result<Self, NameError> {
        validate_snapshot_component(snap)?;
        let full_len = dataset.0.len() + 1 + snap.len();
        if full_len > MAX_NAME_LEN {
            return Err(err(
                "snapshot",
                &format!("{dataset}@{snap}"),
                format!("{full_len} bytes, the limit is {MAX_NAME_LEN}"),
            ));
        }
        Ok(SnapshotName {
            dataset,
            snap: snap.to_string(),
        })
    }

    /// Parses `dataset@snap`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let Some((ds, snap)) = s.split_once('@') else {
            return Err(err("snapshot", s, "missing '@'"));
        };
        SnapshotName::new(DatasetName::parse(ds)?, snap)
    }

    /// The dataset part.
    pub fn dataset(&self) -> &DatasetName {
        &self.dataset
    }

    /// The part after `@`.
    pub fn snap(&self) -> &str {
        &self.snap
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.dataset, self.snap)
    }
}

/// What an incremental `zfs send` starts from: a snapshot, or a bookmark of one
/// (`dataset#name`, OpenZFS), which keeps its GUID and creation txg after the snapshot was
/// destroyed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SendBase {
    /// `dataset@snap`.
    Snapshot(SnapshotName),
    /// `dataset#bookmark`: the dataset and the part after `#` (checked like a snapshot's).
    Bookmark(DatasetName, String),
}

impl SendBase {
    /// `dataset#name`, validated like a snapshot name.
    pub fn bookmark(dataset: DatasetName, name: &str) -> Result<Self, NameError> {
        let snap = SnapshotName::new(dataset, name)?;
        Ok(SendBase::Bookmark(snap.dataset, snap.snap))
    }

    /// The snapshot, if the base is one.
    pub fn snapshot(&self) -> Option<&SnapshotName> {
        match self {
            SendBase::Snapshot(s) => Some(s),
            SendBase::Bookmark(..) => None,
        }
    }
}

impl fmt::Display for SendBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendBase::Snapshot(s) => s.fmt(f),
            SendBase::Bookmark(ds, name) => write!(f, "{ds}#{name}"),
        }
    }
}

/// Validates the part of a snapshot name after `@`.
pub fn validate_snapshot_component(snap: &str) -> Result<(), NameError> {
    let what = "snapshot";
    if snap.is_empty() {
        return Err(err(what, snap, "empty"));
    }
    if snap == "." || snap == ".." {
        return Err(err(what, snap, format!("'{snap}' is not a snapshot name")));
    }
    if let Some(c) = snap.chars().find(|&c| !snapshot_char(c)) {
        return Err(err(
            what,
            snap,
            format!("character {c:?} (allowed: letters, digits, space, '_', '-', '.', ':')"),
        ));
    }
    if snap.len() > MAX_NAME_LEN {
        return Err(err(what, snap, "too long"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("tank")]
    #[case("tank/home")]
    #[case("backup/hostA/home.v2:x_y-z")]
    #[case("Z9/a")]
    fn valid_datasets(#[case] s: &str) {
        assert_eq!(DatasetName::parse(s).unwrap().as_str(), s);
    }

    #[rstest]
    #[case("", "empty")]
    #[case("-oops", "begin with a letter")]
    #[case("/tank", "leading '/'")]
    #[case("tank/", "trailing '/'")]
    #[case("tank//a", "empty component")]
    #[case("tank/../etc", "'..' component")]
    #[case("tank/./a", "'.' component")]
    #[case("tank/a b", "character ' '")]
    #[case("tank/a;rm -rf", "character ';'")]
    #[case("tank/$(id)", "character '$'")]
    #[case("tank/a`b`", "character '`'")]
    #[case("tank/a\nb", "character '\\n'")]
    #[case("tank@snap", "'@' is not allowed")]
    #[case("tank#bm", "'#' is not allowed")]
    #[case("1tank", "begin with a letter")]
    #[case("mirror/a", "reserved")]
    #[case("raidz2", "reserved")]
    #[case("tank/ü", "character 'ü'")]
    fn invalid_datasets(#[case] s: &str, #[case] why: &str) {
        let e = DatasetName::parse(s).unwrap_err();
        assert!(e.reason.contains(why), "{s:?}: {e}");
    }

    #[test]
    fn too_long() {
        let s = format!("tank/{}", "a".repeat(MAX_NAME_LEN));
        assert!(DatasetName::parse(&s).unwrap_err().reason.contains("limit"));
    }

    #[test]
    fn within_and_rebase() {
        let root = DatasetName::parse("backup/a").unwrap();
        let d = |s| DatasetName::parse(s).unwrap();
        assert!(d("backup/a").is_within(&root));
        assert!(d("backup/a/x/y").is_within(&root));
        assert!(!d("backup/ab").is_within(&root));
        assert!(!d("backup").is_within(&root));
        assert!(!d("other/a").is_within(&root));
        assert_eq!(
            d("tank/home/c")
                .rebase(&d("tank/home"), &d("backup/h"))
                .unwrap(),
            d("backup/h/c")
        );
        assert!(d("tank/x").rebase(&d("tank/home"), &d("backup/h")).is_err());
        assert_eq!(d("a/b/c").parent(), Some(d("a/b")));
        assert_eq!(d("a").parent(), None);
        assert_eq!(d("a/b/c").depth(), 3);
    }

    #[rstest]
    #[case("tank/home@zq_2026-11-21T10:00:00.000Z")]
    #[case("tank@s 3")]
    #[case("tank/a@autosnap_2026-01-01_00:00:00_hourly")]
    fn valid_snapshots(#[case] s: &str) {
        assert_eq!(SnapshotName::parse(s).unwrap().to_string(), s);
    }

    #[rstest]
    #[case("tank")]
    #[case("tank@")]
    #[case("tank@a@b")]
    #[case("tank@a/b")]
    #[case("tank@..")]
    #[case("tank@a;b")]
    fn invalid_snapshots(#[case] s: &str) {
        assert!(SnapshotName::parse(s).is_err(), "{s}");
    }
}
