//! Which source datasets must be listed again, from OpenZFS's `snapshots_changed` (the time,
//! in whole seconds, a snapshot of the dataset was last created or destroyed).
//!
//! A value is trusted only if it is older than the moment it was read by more than a second:
//! a snapshot created later in the same second as the last change would leave the value
//! unchanged, so a value that recent says nothing about what happens next. Such a dataset
//! is listed again on the next check, by which time its value has aged.

use std::collections::HashMap;

use zq_store::DatasetName;

/// The `snapshots_changed` values of datasets whose listing reflects them.
#[derive(Debug, Default)]
pub struct Changes {
    trusted: HashMap<DatasetName, u64>,
}

impl Changes {
    /// The datasets of `current` whose snapshot lists may differ from their last listing.
    pub fn stale<'a>(&self, current: &'a [(DatasetName, Option<u64>)]) -> Vec<&'a DatasetName> {
        current
            .iter()
            .filter(|(name, v)| v.is_none() || self.trusted.get(name) != v.as_ref())
            .map(|(name, _)| name)
            .collect()
    }

    /// Records `current`, read at `read_at` (UTC seconds) before listings that are now done:
    /// from now on each trusted value stands for its dataset's listing.
    pub fn record(&mut self, current: &[(DatasetName, Option<u64>)], read_at: u64) {
        self.trusted = current
            .iter()
            .filter_map(|(name, v)| {
                let v = (*v)?;
                (v.saturating_add(1) < read_at).then(|| (name.clone(), v))
            })
            .collect();
    }

    /// Forgets everything: every dataset is listed on the next check.
    pub fn clear(&mut self) {
        self.trusted.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str) -> DatasetName {
        DatasetName::parse(name).unwrap()
    }

    #[test]
    fn nothing_is_trusted_before_a_record() {
        let c = Changes::default();
        let cur = [(d("t/a"), Some(100))];
        assert_eq!(c.stale(&cur), [&d("t/a")]);
    }

    #[test]
    fn an_unchanged_old_value_needs_no_listing_and_a_changed_one_does() {
        let mut c = Changes::default();
        c.record(&[(d("t/a"), Some(100)), (d("t/b"), Some(100))], 200);
        let cur = [(d("t/a"), Some(100)), (d("t/b"), Some(150))];
        assert_eq!(c.stale(&cur), [&d("t/b")]);
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
        );
        let cur = [
            (d("t/a"), Some(200)),
            (d("t/b"), Some(199)),
            (d("t/c"), Some(198)),
        ];
        assert_eq!(c.stale(&cur), [&d("t/a"), &d("t/b")]);
    }

    #[test]
    fn unknown_values_and_new_datasets_are_always_stale() {
        let mut c = Changes::default();
        c.record(&[(d("t/a"), None)], 1000);
        let cur = [(d("t/a"), None), (d("t/new"), Some(5))];
        assert_eq!(c.stale(&cur), [&d("t/a"), &d("t/new")]);
    }

    #[test]
    fn clear_forgets() {
        let mut c = Changes::default();
        c.record(&[(d("t/a"), Some(1))], 1000);
        c.clear();
        assert_eq!(c.stale(&[(d("t/a"), Some(1))]), [&d("t/a")]);
    }
}
