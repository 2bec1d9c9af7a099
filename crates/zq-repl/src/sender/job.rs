//! A job and its orchestration: one batched listing of both sides, a plan per dataset,
//! steps parents first; and the daemon's `send_new` on top of a known cursor.

use std::collections::HashMap;

use futures_util::stream::{self, StreamExt};
use tracing::{debug, info, info_span, warn, Instrument};
use zq_proto::Committed;
use zq_store::{DatasetName, Zfs};

use crate::error::ReplError;
use crate::lanes::Slot;
use crate::plan::{plan_with_bookmarks, PlanOptions, Step};
use crate::protect::Protector;
use crate::report::{to_info, DatasetOutcome, DatasetReport};

use super::session::Kept;
use super::session::Sender;
use super::step::{native_resumable_step, resumable_step, Resume, StepDone};

/// Where `zfs send -I` is slow, backlogs up to this many snapshots go as a chain of `-i`
/// steps. On zfs-fuse a `-i` step costs about one `-I` of a dataset with 10–15 snapshots
/// (~50 ms, mostly `zfs receive`, against ~4 ms per snapshot of the dataset for `-I`);
/// longer backlogs are rare (after an outage) and go as one `-I`.
pub const CHAIN_UP_TO: usize = 16;

/// One replication job: a source dataset (tree) and where it goes.
#[derive(Debug, Clone)]
pub struct Job {
    /// Source dataset.
    pub source: DatasetName,
    /// Target dataset on the receiver.
    pub target: DatasetName,
    /// Also replicate every descendant, parents first.
    pub recursive: bool,
    /// Planning options (`-i` vs `-I`, `--force`).
    pub options: PlanOptions,
    /// Which of the datasets a recursive job replicates.
    pub filter: crate::filter::DatasetFilter,
    /// Which snapshots of each dataset are replicated. When it leaves any out, steps never
    /// use `zfs send -I` (which carries every snapshot in between) but chains of `-i`.
    pub snapshots: crate::filter::SnapshotFilter,
    /// How many datasets a one-shot run replicates at once (`--max-steps`): the children
    /// of one depth side by side, each after its parent.
    pub parallel: usize,
}

impl Job {
    /// The snapshots of a dataset (oldest first) this job replicates, in wire form.
    pub fn kept_snapshots(&self, snapshots: &[zq_store::Snapshot]) -> Vec<zq_proto::SnapshotInfo> {
        snapshots
            .iter()
            .filter(|s| self.snapshots.keeps(&s.name))
            .map(to_info)
            .collect()
    }

    /// The items of `all` (source datasets, by `name`) this job replicates: all of them
    /// without a filter; reads the filter's property with one `zfs get` if it has one.
    pub async fn select<T>(
        &self,
        zfs: &Zfs,
        all: Vec<T>,
        name: impl Fn(&T) -> &DatasetName,
    ) -> Result<Vec<T>, zq_store::StoreError> {
        if self.filter.is_empty() {
            return Ok(all);
        }
        let by_property = match &self.filter.exclude_property {
            Some(p) => self.filter.excluded_by_property(
                &zfs.property_values(&self.source, self.recursive, &p.name)
                    .await?,
            ),
            None => Default::default(),
        };
        Ok(all
            .into_iter()
            .filter(|t| self.filter.keeps(&self.source, name(t), &by_property))
            .collect())
    }
}

/// What the source's listing says of one dataset, for [`Sender::tidy`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Listed<'a> {
    source: &'a [zq_proto::SnapshotInfo],
    bookmarks: &'a [zq_proto::SnapshotInfo],
    held: Option<&'a [String]>,
}

/// Whether a listing of the destination's newest snapshots ([`Listing::newest_only`]) is
/// not enough to plan `job` over `sources`: with `--force` (which acts on the whole
/// destination), or where a target's newest snapshot is none of its source's snapshots
/// and bookmarks the job replicates (a divergence, or an older common snapshot to find).
fn needs_full_listing(
    job: &Job,
    sources: &[zq_store::DatasetState],
    listing: &super::session::Listing,
) -> bool {
    if !listing.newest_only {
        return false;
    }
    if job.options.force {
        return true;
    }
    sources.iter().any(|src| {
        let Ok(target) = src.name.rebase(&job.source, &job.target) else {
            return true;
        };
        let Some(newest) = listing
            .datasets
            .iter()
            .find(|d| d.name == target.as_str())
            .and_then(|d| d.snapshots.last())
        else {
            return false;
        };
        let common = job
            .kept_snapshots(&src.snapshots)
            .iter()
            .any(|s| s.guid == newest.guid)
            || src.bookmarks.iter().any(|b| b.guid == newest.guid);
        !common
    })
}

impl Sender {
    /// Replicates `job`: lists both sides once, plans each dataset, runs the steps
    /// (parents before children, siblings side by side: `job.parallel`). One dataset's
    /// failure does not stop its siblings, but a dataset whose parent failed is skipped.
    pub async fn replicate(&self, job: &Job) -> Result<Vec<DatasetReport>, ReplError> {
        // Both listings at once: one local zfs call and one round trip; the source pool's
        // features (for the steps' zfs send options) meanwhile, where it has any.
        // The listing says which snapshots are held: the tidy of stale holds needs no
        // query of its own.
        let lister = self.zfs.clone().listing_holds();
        // Of the destination, each dataset's newest snapshot is enough when the source has
        // it: the next step starts there (and a newer one there would be a divergence the
        // newest shows). Only when it is not, or with --force, is the destination listed
        // in full; so a run's cost on the receiver does not grow with history.
        let (sources, dest, _) = tokio::join!(
            lister.list(&job.source, job.recursive),
            self.list_remote_newest(&job.target, job.recursive),
            self.zfs.pool_features(job.source.pool())
        );
        let sources = sources?;
        if sources.is_empty() {
            return Err(ReplError::SourceMissing(job.source.to_string()));
        }
        let sources = job.select(&self.zfs, sources, |s| &s.name).await?;
        if sources.is_empty() {
            return Err(ReplError::AllExcluded(job.source.to_string()));
        }
        let mut listing = dest?;
        if needs_full_listing(job, &sources, &listing) {
            debug!("the destination's newest snapshot is not the source's everywhere; listing it in full");
            listing = self.list_remote(&job.target, job.recursive).await?;
        }
        let dest: HashMap<&str, &[zq_proto::SnapshotInfo]> = listing
            .datasets
            .iter()
            .map(|d| (d.name.as_str(), d.snapshots.as_slice()))
            .collect();
        let targets = sources
            .iter()
            .map(|s| s.name.rebase(&job.source, &job.target))
            .collect::<Result<Vec<_>, _>>()?;
        // Waves by depth: every dataset starts after its parent's outcome is known (a
        // full receive needs the parent; a failed parent skips its children), and the
        // datasets of a wave run side by side, up to `job.parallel` at once.
        let depth = |i: usize| sources[i].name.as_str().matches('/').count();
        let mut order: Vec<usize> = (0..sources.len()).collect();
        order.sort_by_key(|&i| depth(i));
        let mut reports: Vec<(usize, DatasetReport)> = Vec::new();
        for wave in order.chunk_by(|&a, &b| depth(a) == depth(b)) {
            let one = |i: usize| {
                let (src, target) = (&sources[i], &targets[i]);
                let parent_failed = reports.iter().any(|(_, r)| {
                    matches!(r.outcome, DatasetOutcome::Failed(_)) && src.name.is_within(&r.source)
                });
                let dest_snaps = dest.get(target.as_str()).copied();
                let kept = listing.kept(target);
                async move {
                    let outcome = if parent_failed {
                        DatasetOutcome::Failed(ReplError::Skipped("its parent failed".into()))
                    } else {
                        let span = info_span!("dataset", source = %src.name, target = %target);
                        let snapshots = job.kept_snapshots(&src.snapshots);
                        let bookmarks: Vec<_> = src.bookmarks.iter().map(to_info).collect();
                        self.replicate_dataset(
                            &src.name,
                            &snapshots,
                            &bookmarks,
                            src.held.as_deref(),
                            target,
                            dest_snaps,
                            kept.as_ref(),
                            job.options,
                            &mut Slot::unlimited(),
                        )
                        .instrument(span)
                        .await
                    };
                    let report = DatasetReport {
                        source: src.name.clone(),
                        target: target.clone(),
                        outcome,
                    };
                    (i, report)
                }
            };
            // Collected first: a stream holding the closure would not be Send.
            let futures: Vec<_> = wave.iter().map(|&i| one(i)).collect();
            let done: Vec<(usize, DatasetReport)> = stream::iter(futures)
                .buffer_unordered(job.parallel.max(1))
                .collect()
                .await;
            reports.extend(done);
        }
        // In the listing's order: parents first.
        reports.sort_by_key(|(i, _)| *i);
        Ok(reports.into_iter().map(|(_, r)| r).collect())
    }

    /// Brings one dataset up to date given what the destination holds: its snapshot list,
    /// `None` if it does not exist, or in steady state just the cursor (the snapshot the
    /// receiver last committed). The receiver re-checks the base, so a stale cursor gives
    /// a `Diverged`/`BaseMissing` error and the caller lists again. With `kept` (what the
    /// receiver's listing says it kept of an interrupted step into the target: zfs's
    /// partial receive or its spool), the interrupted step continues first if it is still
    /// the way forward: its base is the destination's newest snapshot and its `to` still
    /// exists here. Otherwise the plan's first step replaces it (a partial receive is
    /// discarded then, with a log line saying why). `held`: the source's snapshots with
    /// user holds, if its listing said ([`zq_store::DatasetState::held`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn replicate_dataset(
        &self,
        src: &DatasetName,
        source: &[zq_proto::SnapshotInfo],
        bookmarks: &[zq_proto::SnapshotInfo],
        held: Option<&[String]>,
        target: &DatasetName,
        dest: Option<&[zq_proto::SnapshotInfo]>,
        kept: Option<&Kept>,
        options: PlanOptions,
        slot: &mut Slot,
    ) -> DatasetOutcome {
        let options = PlanOptions {
            chain_up_to: self.chain_up_to(),
            ..options
        };
        let (mut steps, mut bytes, mut resumed, mut last) = (0, 0, 0, None);
        let mut resumed_from = None;
        let resumed_dest;
        let mut dest = dest;
        let (resume, mut first) = match kept {
            None => (None, Resume::Fresh),
            Some(Kept::Spool(t)) => match resumable_step(t, source, dest) {
                Some(step) => (Some((Resume::Spool(t.clone()), step)), Resume::Fresh),
                None => {
                    info!(to = %t.to.name, offset = t.offset, "the receiver's spooled step is no longer the way forward; it will be replaced");
                    (None, Resume::Fresh)
                }
            },
            Some(Kept::Native(token)) => {
                match self.native_step(src, token, source, bookmarks, dest).await {
                    Ok((decoded, step)) => {
                        let r = Resume::Native {
                            token: token.clone(),
                            decoded,
                        };
                        (Some((r, step)), Resume::Fresh)
                    }
                    Err(why) => {
                        info!(reason = %why, "the receiver's partial receive (zfs receive -s) is no longer the way forward; it will be discarded (zfs receive -A)");
                        (None, Resume::Discard)
                    }
                }
            }
        };
        if let Some(p) = &self.config.protector {
            self.tidy(
                p,
                src,
                Listed {
                    source,
                    bookmarks,
                    held,
                },
                dest,
                resume.as_ref().map(|(_, s)| s),
            )
            .await;
        }
        if let Some((how, step)) = resume {
            match self
                .run_step(src, target, &step, zq_proto::ForceAction::None, slot, &how)
                .await
            {
                Ok(done) => {
                    steps += 1;
                    bytes += done.bytes;
                    resumed += done.resumed;
                    resumed_from = done.resumed_from;
                    resumed_dest = done.committed.snapshots.clone();
                    dest = Some(&resumed_dest);
                    last = Some(done.committed);
                }
                Err(e) => {
                    warn!(error = %e, "resumed step failed");
                    return DatasetOutcome::Failed(e);
                }
            }
        }
        let plan = match plan_with_bookmarks(source, bookmarks, dest, options) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "refusing to replicate");
                return DatasetOutcome::Failed(e.into());
            }
        };
        if let Some(note) = &plan.note {
            info!("{note}");
        }
        if plan.steps.is_empty() && last.is_none() {
            info!("up to date");
            return DatasetOutcome::UpToDate;
        }
        let mut force = plan.force.clone();
        for step in &plan.steps {
            let how = std::mem::replace(&mut first, Resume::Fresh);
            match self.run_step(src, target, step, force, slot, &how).await {
                Ok(done) => {
                    steps += 1;
                    bytes += done.bytes;
                    last = Some(done.committed);
                }
                Err(e) => {
                    warn!(error = %e, "step failed");
                    return DatasetOutcome::Failed(e);
                }
            }
            // Destruction, if any, was done before the first step.
            force = zq_proto::ForceAction::None;
        }
        // Exit 0 means the destination holds every snapshot it was asked to: check the
        // receiver's own listing after the last step rather than trusting the plan.
        let held = last.map(|c| c.snapshots).unwrap_or_default();
        let missing: Vec<String> = plan
            .expected(source)
            .into_iter()
            .filter(|s| !held.iter().any(|h| h.guid == s.guid))
            .map(|s| format!("@{}", s.name))
            .collect();
        if !missing.is_empty() {
            return DatasetOutcome::Failed(ReplError::Protocol(format!(
                "every step was committed, but the destination lacks {}",
                missing.join(", ")
            )));
        }
        let newest = held
            .iter()
            .rev()
            .find(|h| source.iter().any(|s| s.guid == h.guid))
            .map(|s| s.name.clone())
            .unwrap_or_default();
        DatasetOutcome::Sent {
            steps,
            bytes,
            resumed,
            resumed_from,
            newest,
            committed: held.len(),
        }
    }

    /// The step a native resume token continues, if it is still the way forward: the
    /// session resumes natively, its `to` exists in `source` (same GUID), its base is the
    /// destination's newest snapshot (for a full stream, the destination has none), and
    /// it was as raw as this job would send it now. Otherwise why not, for the log.
    async fn native_step(
        &self,
        src: &DatasetName,
        token: &str,
        source: &[zq_proto::SnapshotInfo],
        bookmarks: &[zq_proto::SnapshotInfo],
        dest: Option<&[zq_proto::SnapshotInfo]>,
    ) -> Result<(zq_store::token::ResumeToken, Step), String> {
        if !self.native_resume() {
            return Err("this session does not resume with zfs send -t (zfs-token)".into());
        }
        let t = zq_store::token::decode(token).map_err(|e| e.to_string())?;
        // zfs send -t finds the snapshot by its GUID, checked below against this
        // dataset's; a token naming another dataset is not this step's.
        if t.to_name.split_once('@').map(|(ds, _)| ds) != Some(src.as_str()) {
            return Err(format!("it names {}, not a snapshot of {src}", t.to_name));
        }
        let step = native_resumable_step(&t, source, bookmarks, dest)?;
        let encrypted = self
            .zfs
            .encryption(src)
            .await
            .map_err(|e| e.to_string())?
            .is_some_and(|e| crate::receiver::is_encrypted(&e));
        let raw_now = encrypted && self.config.send.encrypted == crate::sendflags::Encrypted::Raw;
        if t.raw != raw_now {
            return Err(format!(
                "the interrupted stream was {}raw, this job sends the dataset {}raw",
                if t.raw { "" } else { "not " },
                if raw_now { "" } else { "not " }
            ));
        }
        Ok((t, step))
    }

    /// Cleans up the job's holds and cursor bookmarks on `src` that are no longer needed
    /// ([`Protector::tidy`]): the cursor stays on the destination's newest snapshot, step
    /// holds on a step still to be resumed. A failure is logged; the next planned step
    /// tries again.
    pub(super) async fn tidy(
        &self,
        p: &Protector,
        src: &DatasetName,
        listed: Listed<'_>,
        dest: Option<&[zq_proto::SnapshotInfo]>,
        resuming: Option<&Step>,
    ) {
        let Listed {
            source,
            bookmarks,
            held,
        } = listed;
        let snap = |name: &str| src.snapshot(name).ok();
        let newest = dest.and_then(|d| d.last());
        let cursor = newest
            .and_then(|n| source.iter().find(|s| s.guid == n.guid))
            .and_then(|s| snap(&s.name));
        let cursor_guid = newest
            .map(|n| n.guid)
            .filter(|g| source.iter().chain(bookmarks).any(|s| s.guid == *g));
        let keep: Vec<_> = match resuming {
            Some(Step::Incremental { from, to, .. }) => [snap(&from.name), snap(&to.name)]
                .into_iter()
                .flatten()
                .collect(),
            Some(Step::Full { to }) => snap(&to.name).into_iter().collect(),
            None => Vec::new(),
        };
        let snapshots: Vec<_> = source.iter().filter_map(|s| snap(&s.name)).collect();
        let marks: Vec<(String, u64)> =
            bookmarks.iter().map(|b| (b.name.clone(), b.guid)).collect();
        let input = crate::protect::TidyInput {
            snapshots: &snapshots,
            bookmarks: &marks,
            cursor: cursor.as_ref(),
            cursor_guid,
            keep_step: &keep,
            held,
        };
        if let Err(e) = p.tidy(src, input).await {
            warn!(error = %e, "cannot clean up the job's holds and bookmarks no longer needed");
        }
    }

    /// How many new snapshots to send as a chain of `-i` steps rather than one `-I` step
    /// (see [`PlanOptions::chain_up_to`]).
    pub(super) fn chain_up_to(&self) -> usize {
        if !self.config.intermediates {
            usize::MAX
        } else if self.zfs.capabilities().cheap_intermediates {
            0
        } else {
            CHAIN_UP_TO
        }
    }

    /// Sends the snapshots the daemon just created (`new`, oldest first, GUIDs unknown) on
    /// top of `from`, the snapshot the receiver last committed, without listing either side:
    /// `-i` for one snapshot, and for several one `-I` step or, where `-I` is slow, a chain
    /// of `-i` steps (unless `newest_only`). Returns the receiver's last commit, whose `guid`
    /// is the newest snapshot's, and the bytes sent. A chain that fails part-way has
    /// committed its first steps; the receiver's refusal of the stale cursor then says so.
    /// Needs protocol version 2 (the receiver resolves the GUID); check [`Self::session`].
    pub async fn send_new(
        &self,
        source: &DatasetName,
        target: &DatasetName,
        from: &zq_proto::SnapshotInfo,
        new: &[String],
        newest_only: bool,
        slot: &mut Slot,
    ) -> Result<(Committed, u64), ReplError> {
        let Some(newest) = new.last() else {
            return Err(ReplError::Protocol("nothing new to send".into()));
        };
        if self.session.version < 2 {
            return Err(ReplError::Protocol(format!(
                "the receiver speaks protocol version {}; sending a snapshot by name needs 2",
                self.session.version
            )));
        }
        let by_name = |name: &String| zq_proto::SnapshotInfo {
            name: name.clone(),
            guid: 0,
            createtxg: 0,
        };
        // One step (all of `new` with -I, or only the newest with -i), or a chain of -i
        // steps, each from the snapshot the one before committed.
        let one = new.len() == 1 || newest_only || new.len() > self.chain_up_to();
        let steps: Vec<&String> = match one {
            true => vec![newest],
            false => new.iter().collect(),
        };
        let intermediates = one && new.len() > 1 && !newest_only;
        let (mut from, mut bytes, mut last) = (from.clone(), 0, None);
        for name in steps {
            let step = Step::Incremental {
                from,
                to: by_name(name),
                intermediates,
                bookmark: None,
            };
            let StepDone {
                committed,
                bytes: n,
                ..
            } = self
                .run_step(
                    source,
                    target,
                    &step,
                    zq_proto::ForceAction::None,
                    slot,
                    &Resume::Fresh,
                )
                .await?;
            from = zq_proto::SnapshotInfo {
                guid: committed.guid,
                ..by_name(name)
            };
            bytes += n;
            last = Some(committed);
        }
        let last = last.ok_or_else(|| ReplError::Protocol("nothing new to send".into()))?;
        Ok((last, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sender::session::Listing;
    use zq_store::{DatasetState, Kind, Snapshot};

    fn name(s: &str) -> DatasetName {
        DatasetName::parse(s).unwrap()
    }

    fn snap(name: &str, guid: u64) -> Snapshot {
        Snapshot {
            name: name.into(),
            guid,
            createtxg: guid,
        }
    }

    fn source(ds: &str, snapshots: Vec<Snapshot>, bookmarks: Vec<Snapshot>) -> DatasetState {
        DatasetState {
            name: name(ds),
            kind: Kind::Filesystem,
            encryption: None,
            resume_token: None,
            snapshots,
            bookmarks,
            held: None,
        }
    }

    fn newest(targets: &[(&str, Option<u64>)]) -> Listing {
        Listing {
            datasets: targets
                .iter()
                .map(|(t, g)| zq_proto::DatasetSnapshots {
                    name: t.to_string(),
                    snapshots: g
                        .iter()
                        .map(|g| to_info(&snap(&format!("s{g}"), *g)))
                        .collect(),
                })
                .collect(),
            newest_only: true,
            ..Default::default()
        }
    }

    fn job() -> Job {
        Job {
            source: name("src/a"),
            target: name("dst/a"),
            recursive: true,
            options: PlanOptions::default(),
            filter: Default::default(),
            snapshots: Default::default(),
            parallel: 1,
        }
    }

    #[test]
    fn the_newest_snapshots_do_when_the_source_has_each() {
        let sources = [
            source("src/a", vec![snap("s1", 1), snap("s2", 2)], vec![]),
            // Its newest replicated snapshot destroyed, its cursor bookmark kept.
            source("src/a/b", vec![snap("s4", 4)], vec![snap("s3", 3)]),
            source("src/a/new", vec![snap("s5", 5)], vec![]),
            source("src/a/empty", vec![snap("s6", 6)], vec![]),
        ];
        let listing = newest(&[
            ("dst/a", Some(1)),
            ("dst/a/b", Some(3)),
            ("dst/a/empty", None),
        ]);
        assert!(!needs_full_listing(&job(), &sources, &listing));

        let full = Listing {
            newest_only: false,
            ..listing.clone()
        };
        let diverged = newest(&[("dst/a", Some(9))]);
        assert!(needs_full_listing(&job(), &sources, &diverged));
        // A full listing is never listed again.
        let diverged_full = Listing {
            newest_only: false,
            ..diverged
        };
        assert!(!needs_full_listing(&job(), &sources, &diverged_full));
        assert!(!needs_full_listing(&job(), &sources, &full));

        let mut force = job();
        force.options.force = true;
        assert!(needs_full_listing(&force, &sources, &listing));

        // A snapshot the job does not replicate is no common base.
        let mut filtered = job();
        filtered.snapshots.exclude = vec![regex::Regex::new("^s1$").unwrap()];
        assert!(needs_full_listing(&filtered, &sources, &listing));
    }
}
