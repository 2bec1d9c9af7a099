//! Which source datasets must be listed again, from OpenZFS's `snapshots_changed` (the time,
//! in whole seconds, a snapshot of the dataset was last created or destroyed).
//!
//! A value is trusted only if it is older than the moment it was read by more than a second:
//! a snapshot created later in the same second as the last change would leave the value
//! unchanged, so a value that recent says nothing about what happens next. Such a young
//! value's dataset is listed again on the next check, by which time its value has aged.
//! Where zfs tells of every new snapshot (`zpool events`), it is listed again only when an
//! event since its last listing began says something that listing may lack: otherwise each
//! snapshot caused two more listings of its datasets, once a second while their steps ran,
//! competing with them.

use std::collections::HashMap;
use std::time::Instant;

use zq_store::DatasetName;

/// The `snapshots_changed` values of datasets whose listing reflects them.
#[derive(Debug, Default)]
pub struct Changes {
    trusted: HashMap<DatasetName, u64>,
    /// Values too recent to trust when their datasets were last listed, and when that
    /// listing started.
    young: HashMap<DatasetName, (u64, Instant)>,
}

/// Whether a value read at `read_at` (UTC seconds) is old enough to trust.
fn aged(value: u64, read_at: u64) -> bool {
    value.saturating_add(1) < read_at
}

impl Changes {
    /// The datasets of `current` whose snapshot lists may differ from their last listing. A young value that has not changed since its
    /// dataset's last listing needs none while `quiet(dataset, start of that listing)`: zfs
    /// tells of every new snapshot and told of none since that the listing lacks.
    pub fn stale<'a>(
        &self,
        current: &'a [(DatasetName, Option<u64>)],
        quiet: impl Fn(&DatasetName, Instant) -> bool,
    ) -> Vec<&'a DatasetName> {
        current
            .iter()
            .filter(|(name, v)| {
                let Some(v) = v else { return true };
                if self.trusted.get(name) == Some(v) {
                    return false;
                }
                match self.young.get(name) {
                    Some((young, listed)) if young == v => !quiet(name, *listed),
                    _ => true,
                }
            })
            .map(|(name, _)| name)
            .collect()
    }

    /// Records `current`, read at `read_at` (UTC seconds) before the listings of the
    /// datasets `listed` names, which started at `listed_at` and are now done: from now on
    /// each trusted value stands for its dataset's listing. The others keep what they had:
    /// a young value stays young until its dataset is listed again, however old it gets (an
    /// event of a snapshot made just after its listing may still be on its way).
    pub fn record(
        &mut self,
        current: &[(DatasetName, Option<u64>)],
        read_at: u64,
        listed_at: Instant,
        listed: impl Fn(&DatasetName) -> bool,
    ) {
        let trusted = std::mem::take(&mut self.trusted);
        let young = std::mem::take(&mut self.young);
        for (name, v) in current {
            let Some(v) = *v else { continue };
            if listed(name) {
                if aged(v, read_at) {
                    self.trusted.insert(name.clone(), v);
                } else {
                    self.young.insert(name.clone(), (v, listed_at));
                }
            } else if trusted.get(name) == Some(&v) {
                self.trusted.insert(name.clone(), v);
            } else if let Some(&(y, at)) = young.get(name).filter(|y| y.0 == v) {
                self.young.insert(name.clone(), (y, at));
            }
        }
    }

    /// Forgets everything: every dataset is listed on the next check.
    pub fn clear(&mut self) {
        self.trusted.clear();
        self.young.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str) -> DatasetName {
        DatasetName::parse(name).unwrap()
    }

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn nothing_is_trusted_before_a_record() {
        let c = Changes::default();
        let cur = [(d("t/a"), Some(100))];
        assert_eq!(c.stale(&cur, |_, _| false), [&d("t/a")]);
    }

    #[test]
    fn an_unchanged_old_value_needs_no_listing_and_a_changed_one_does() {
        let mut c = Changes::default();
        c.record(
            &[(d("t/a"), Some(100)), (d("t/b"), Some(100))],
            200,
            now(),
            |_| true,
        );
        let cur = [(d("t/a"), Some(100)), (d("t/b"), Some(150))];
        assert_eq!(c.stale(&cur, |_, _| false), [&d("t/b")]);
    }

    #[test]
    fn a_value_from_the_second_it_was_read_in_or_the_one_before_is_not_trusted() {
        let mut c = Changes::default();
        c.record(
            &[
                (d("t/a"), Some(200)),
                (d("t/b"), Some(199)),
                (d("t/c"), Some(198)),
            ],
            200,
            now(),
            |_| true,
        );
        let cur = [
            (d("t/a"), Some(200)),
            (d("t/b"), Some(199)),
            (d("t/c"), Some(198)),
        ];
        assert_eq!(c.stale(&cur, |_, _| false), [&d("t/a"), &d("t/b")]);
    }

    #[test]
    fn where_zfs_tells_of_snapshots_a_young_value_waits_for_word_from_it() {
        let mut c = Changes::default();
        c.record(
            &[(d("t/a"), Some(200)), (d("t/b"), Some(200))],
            200,
            now(),
            |_| true,
        );
        // t/b changed again: listed at once; t/a is as its listing left it.
        let cur = [(d("t/a"), Some(200)), (d("t/b"), Some(201))];
        assert_eq!(c.stale(&cur, |_, _| true), [&d("t/b")]);
        c.record(&cur, 201, now(), |n| n == &d("t/b"));
        // However old, neither is listed while zfs says nothing …
        assert!(c.stale(&cur, |_, _| true).is_empty());
        c.record(&cur, 205, now(), |_| false);
        // … and only the one it tells of; then its value is trusted.
        assert_eq!(c.stale(&cur, |n, _| n != &d("t/a")), [&d("t/a")]);
        c.record(&cur, 206, now(), |n| n == &d("t/a"));
        assert_eq!(c.stale(&cur, |_, _| false), [&d("t/b")]);
    }

    #[test]
    fn a_young_value_is_listed_again_when_zfs_told_of_a_snapshot_after_its_listing_began() {
        let mut c = Changes::default();
        let cur = [(d("t/a"), Some(200)), (d("t/b"), Some(200))];
        let (first, second) = (now(), now() + std::time::Duration::from_millis(10));
        c.record(&cur, 200, first, |_| true);
        // Only t/b listed again, later: an event between the two listings concerns t/a.
        c.record(&cur, 200, second, |n| n == &d("t/b"));
        let event = first + std::time::Duration::from_millis(5);
        assert_eq!(c.stale(&cur, |_, since| event < since), [&d("t/a")]);
    }

    #[test]
    fn a_dataset_not_listed_keeps_no_value_that_changed() {
        let mut c = Changes::default();
        c.record(&[(d("t/a"), Some(100))], 200, now(), |_| true);
        // t/a changed, but the pass did not list it (say, excluded by the job's filter).
        let cur = [(d("t/a"), Some(150))];
        c.record(&cur, 300, now(), |_| false);
        assert_eq!(c.stale(&cur, |_, _| true), [&d("t/a")]);
    }

    #[test]
    fn without_word_from_zfs_a_young_value_is_listed_on_every_check() {
        let mut c = Changes::default();
        let cur = [(d("t/a"), Some(200))];
        c.record(&cur, 200, now(), |_| true);
        assert_eq!(c.stale(&cur, |_, _| false), [&d("t/a")]);
        c.record(&cur, 201, now(), |_| true);
        assert_eq!(c.stale(&cur, |_, _| false), [&d("t/a")]);
    }

    #[test]
    fn unknown_values_and_new_datasets_are_always_stale() {
        let mut c = Changes::default();
        c.record(&[(d("t/a"), None)], 1000, now(), |_| true);
        let cur = [(d("t/a"), None), (d("t/new"), Some(5))];
        assert_eq!(c.stale(&cur, |_, _| false), [&d("t/a"), &d("t/new")]);
    }

    #[test]
    fn clear_forgets() {
        let mut c = Changes::default();
        c.record(&[(d("t/a"), Some(1))], 1000, now(), |_| true);
        c.clear();
        assert_eq!(c.stale(&[(d("t/a"), Some(1))], |_, _| false), [&d("t/a")]);
    }
}
