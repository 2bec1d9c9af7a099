//! Which datasets of a recursive job are replicated: `--exclude`, `--exclude-regex`,
//! `--include-regex`, `--exclude-property` and `--skip-parent`. A pure decision per name;
//! the property's values come from one `zfs get` per listing.

use std::collections::HashSet;

use regex::Regex;
use zq_store::DatasetName;

/// A user property and the value that excludes a dataset, e.g. `zq:replicate=off`. ZFS
/// inherits user properties, so setting it on a dataset excludes its subtree unless a
/// descendant sets another value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyMatch {
    /// The property, e.g. `zq:replicate`.
    pub name: String,
    /// The value that excludes, e.g. `off`.
    pub value: String,
}

impl std::str::FromStr for PropertyMatch {
    type Err = String;
    /// `NAME=VALUE`, NAME a user property (`module:name`, lowercase letters, digits and
    /// `:._-`, at most 256 bytes, as ZFS allows).
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected PROPERTY=VALUE, e.g. zq:replicate=off"))?;
        let valid = name.contains(':')
            && name.len() <= 256
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b":._-".contains(&b));
        if !valid {
            return Err(format!(
                "{name:?} is not a user property (module:name in lowercase letters, digits and :._-)"
            ));
        }
        if value.is_empty() || value.contains(['\t', '\n']) {
            return Err(format!(
                "{s:?}: the value must be non-empty, without tabs or newlines"
            ));
        }
        Ok(PropertyMatch {
            name: name.to_string(),
            value: value.to_string(),
        })
    }
}

/// A regex that must match a whole dataset name (`^(?:RE)$`), so `tank/tmp` does not also
/// match `tank/tmp2`; write `tank/tmp(/.*)?` for a subtree.
pub fn anchored(re: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("{re:?}: {e}"))
}

/// Which snapshots of a dataset are replicated (`--include-snapshots`,
/// `--exclude-snapshots`), by the name after `@`. The default keeps every one.
#[derive(Debug, Clone, Default)]
pub struct SnapshotFilter {
    /// If any: only snapshots whose name matches one of these ([`anchored`]).
    pub include: Vec<Regex>,
    /// Snapshots whose name matches one of these.
    pub exclude: Vec<Regex>,
}

impl SnapshotFilter {
    /// True if it keeps every snapshot.
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Whether the snapshot named `name` (after `@`) is replicated.
    pub fn keeps(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|r| r.is_match(name)))
            && !self.exclude.iter().any(|r| r.is_match(name))
    }
}

/// Which datasets a recursive job replicates. The default keeps everything.
#[derive(Debug, Clone, Default)]
pub struct DatasetFilter {
    /// These datasets and everything below them.
    pub exclude: Vec<DatasetName>,
    /// Datasets whose whole name matches one of these ([`anchored`]).
    pub exclude_regex: Vec<Regex>,
    /// If any: only datasets whose whole name matches one of these.
    pub include_regex: Vec<Regex>,
    /// Datasets whose property has this value.
    pub exclude_property: Option<PropertyMatch>,
    /// Leave out the job's source dataset itself (its descendants still go).
    pub skip_parent: bool,
}

impl DatasetFilter {
    /// True if it keeps every dataset.
    pub fn is_empty(&self) -> bool {
        self.exclude.is_empty()
            && self.exclude_regex.is_empty()
            && self.include_regex.is_empty()
            && self.exclude_property.is_none()
            && !self.skip_parent
    }

    /// Whether `name`, in the job rooted at `root`, is replicated; `by_property` holds the
    /// datasets [`DatasetFilter::exclude_property`] matched.
    pub fn keeps(
        &self,
        root: &DatasetName,
        name: &DatasetName,
        by_property: &HashSet<DatasetName>,
    ) -> bool {
        let n = name.as_str();
        let excluded = (self.skip_parent && name == root)
            || self.exclude.iter().any(|e| name.is_within(e))
            || self.exclude_regex.iter().any(|r| r.is_match(n))
            || by_property.contains(name);
        let included =
            self.include_regex.is_empty() || self.include_regex.iter().any(|r| r.is_match(n));
        included && !excluded
    }

    /// The datasets whose property excludes them, from `zfs get` output's (name, value).
    pub fn excluded_by_property(&self, values: &[(DatasetName, String)]) -> HashSet<DatasetName> {
        let Some(p) = &self.exclude_property else {
            return HashSet::new();
        };
        values
            .iter()
            .filter(|(_, v)| *v == p.value)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ds(s: &str) -> DatasetName {
        DatasetName::parse(s).unwrap()
    }

    #[test]
    fn each_rule_excludes_what_it_names() {
        let root = ds("tank/home");
        let none = HashSet::new();
        let f = DatasetFilter {
            exclude: vec![ds("tank/home/tmp")],
            exclude_regex: vec![anchored(".*/cache").unwrap()],
            ..Default::default()
        };
        let keeps = |n: &str| f.keeps(&root, &ds(n), &none);
        assert!(keeps("tank/home") && keeps("tank/home/alice") && keeps("tank/home/tmp2"));
        assert!(!keeps("tank/home/tmp") && !keeps("tank/home/tmp/x"));
        assert!(!keeps("tank/home/alice/cache") && keeps("tank/home/alice/cache/x"));

        let f = DatasetFilter {
            include_regex: vec![anchored("tank/home/(alice|bob)(/.*)?").unwrap()],
            skip_parent: true,
            ..Default::default()
        };
        let keeps = |n: &str| f.keeps(&root, &ds(n), &none);
        assert!(!keeps("tank/home") && keeps("tank/home/alice") && keeps("tank/home/bob/x"));
        assert!(!keeps("tank/home/carol"));
        assert!(!f.is_empty() && DatasetFilter::default().is_empty());
    }

    #[test]
    fn a_property_excludes_where_zfs_says_it_has_the_value() {
        let f = DatasetFilter {
            exclude_property: Some("zq:replicate=off".parse().unwrap()),
            ..Default::default()
        };
        let values = [
            ("tank", "-"),
            ("tank/a", "off"),
            ("tank/a/b", "off"),
            ("tank/c", "on"),
        ]
        .map(|(n, v)| (ds(n), v.to_string()));
        let by = f.excluded_by_property(&values);
        assert_eq!(by, HashSet::from([ds("tank/a"), ds("tank/a/b")]));
        assert!(!f.keeps(&ds("tank"), &ds("tank/a/b"), &by));
        assert!(f.keeps(&ds("tank"), &ds("tank/c"), &by));
    }

    #[test]
    fn snapshot_filters_match_the_name_after_the_at() {
        let f = SnapshotFilter {
            include: vec![anchored("autosnap_.*_(hourly|daily)").unwrap()],
            exclude: vec![anchored(".*_daily").unwrap()],
        };
        assert!(f.keeps("autosnap_2026-11-26_10:00:00_hourly"));
        assert!(!f.keeps("autosnap_2026-11-26_00:00:00_daily"));
        assert!(!f.keeps("autosnap_2026-11-26_10:15:00_frequently"));
        assert!(!f.keeps("zq_2026-11-26T10:00:00.000Z"));
        assert!(
            SnapshotFilter::default().keeps("anything") && SnapshotFilter::default().is_empty()
        );
    }

    #[test]
    fn bad_filters_say_why() {
        assert!("replicate=off"
            .parse::<PropertyMatch>()
            .unwrap_err()
            .contains("user property"));
        assert!("zq:replicate"
            .parse::<PropertyMatch>()
            .unwrap_err()
            .contains("PROPERTY=VALUE"));
        assert!("zq:Rep=off".parse::<PropertyMatch>().is_err());
        assert!("zq:r=".parse::<PropertyMatch>().is_err());
        assert!(anchored("(").unwrap_err().contains("\"(\""));
    }

    proptest! {
        /// A regex never matches a mere prefix of a name.
        #[test]
        fn regexes_match_whole_names(a in "[a-z]{1,8}", b in "[a-z]{1,8}") {
            let re = anchored(&a).unwrap();
            prop_assert!(re.is_match(&a));
            let longer = format!("{a}{b}");
            let slashed = format!("{a}/{b}");
            prop_assert!(!re.is_match(&longer));
            prop_assert!(!re.is_match(&slashed));
        }
    }
}
