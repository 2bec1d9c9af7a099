//! A one-shot run: connect, replicate the job once, and run it again (after the
//! [`Backoff`] of [`crate::retry`]) while datasets fail with errors that may pass. A run
//! skips what is up to date, so a retry sends only what failed.

use std::time::Duration;

use tracing::warn;
use zq_store::DatasetName;

use crate::connector::{ConnectError, Connector};
use crate::error::chain;
use crate::error::ReplError;
use crate::report::{DatasetOutcome, DatasetReport};
use crate::retry::Backoff;
use crate::sender::Job;

/// How often a one-shot run tries again.
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    /// Runs after the first while datasets fail with transient errors.
    pub retries: u32,
    /// The wait before the first of them (then doubling, capped: [`Backoff::retries`]).
    pub delay: Duration,
}

/// A one-shot run failed as a whole (a dataset's own failure is in its report).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The receiver could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The job could not be run (listing failed, nothing to replicate, …).
    #[error("replicating {source_dataset}")]
    Replicate {
        /// The job's source.
        source_dataset: DatasetName,
        /// Why.
        #[source]
        error: ReplError,
    },
}

/// Replicates `job` over `connector`'s connections; returns each dataset's report, merged
/// over the attempts ([`merge_attempts`]).
pub async fn replicate(
    connector: &Connector,
    job: &Job,
    retries: Retries,
) -> Result<Vec<DatasetReport>, RunError> {
    if !job.recursive {
        // One dataset: nothing follows its steps that cursor moves could delay.
        if let Some(p) = &connector.sender_config().protector {
            p.at_once();
        }
    }
    let mut sender = connector.connect().await?;
    let mut reports: Vec<DatasetReport> = Vec::new();
    let mut backoff = Backoff::retries(retries.delay);
    for attempt in 0..=retries.retries {
        if attempt > 0 {
            tokio::time::sleep(backoff.failed()).await;
            if !sender.is_connected() {
                sender = connector.connect().await?;
            }
        }
        let last = attempt == retries.retries;
        let run = match sender.replicate(job).await {
            Ok(r) => r,
            Err(e) if e.transient() && !last => {
                warn!(error = %chain(&e), attempt = attempt + 1, retries = retries.retries, "the job failed; running it again");
                continue;
            }
            Err(error) => {
                return Err(RunError::Replicate {
                    source_dataset: job.source.clone(),
                    error,
                })
            }
        };
        reports = merge_attempts(reports, run);
        let transient = transient_failures(&reports);
        if transient.is_empty() {
            break;
        }
        if !last {
            warn!(datasets = %transient.join(","), attempt = attempt + 1, retries = retries.retries, "datasets failed with errors that may pass; running the job again");
        }
    }
    Ok(reports)
}

/// The datasets that failed with an error that may pass.
fn transient_failures(reports: &[DatasetReport]) -> Vec<String> {
    reports
        .iter()
        .filter_map(|r| match &r.outcome {
            DatasetOutcome::Failed(e) if e.transient() => Some(r.source.to_string()),
            _ => None,
        })
        .collect()
}

/// A dataset's outcome over several runs of the job: the latest, except that a dataset
/// that was sent and then found up to date keeps the report of what was sent.
pub fn merge_attempts(
    before: Vec<DatasetReport>,
    latest: Vec<DatasetReport>,
) -> Vec<DatasetReport> {
    let mut before: Vec<Option<DatasetReport>> = before.into_iter().map(Some).collect();
    latest
        .into_iter()
        .map(|r| {
            let earlier = before
                .iter_mut()
                .find(|b| b.as_ref().is_some_and(|b| b.source == r.source))
                .and_then(Option::take);
            match (earlier, &r.outcome) {
                (Some(e), DatasetOutcome::UpToDate)
                    if matches!(e.outcome, DatasetOutcome::Sent { .. }) =>
                {
                    e
                }
                _ => r,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(source: &str, outcome: DatasetOutcome) -> DatasetReport {
        DatasetReport {
            source: DatasetName::parse(source).unwrap(),
            target: DatasetName::parse(&format!("b/{source}")).unwrap(),
            outcome,
        }
    }

    fn sent(steps: usize) -> DatasetOutcome {
        DatasetOutcome::Sent {
            steps,
            bytes: 10,
            resumed: 0,
            resumed_from: None,
            newest: "s".into(),
            committed: 1,
        }
    }

    fn lost() -> DatasetOutcome {
        DatasetOutcome::Failed(ReplError::Connection("gone".into()))
    }

    fn outcomes(r: &[DatasetReport]) -> Vec<String> {
        r.iter()
            .map(|r| match &r.outcome {
                DatasetOutcome::UpToDate => format!("{} up", r.source),
                DatasetOutcome::Sent { steps, .. } => format!("{} sent {steps}", r.source),
                DatasetOutcome::Failed(_) => format!("{} failed", r.source),
            })
            .collect()
    }

    #[test]
    fn a_retry_keeps_what_the_first_attempt_sent() {
        let first = vec![report("t/a", sent(2)), report("t/b", lost())];
        assert_eq!(transient_failures(&first), ["t/b"]);
        let second = vec![
            report("t/a", DatasetOutcome::UpToDate),
            report("t/b", sent(1)),
        ];
        let merged = merge_attempts(first, second);
        assert_eq!(outcomes(&merged), ["t/a sent 2", "t/b sent 1"]);
        assert!(transient_failures(&merged).is_empty());
    }

    #[test]
    fn the_latest_failure_or_new_dataset_wins() {
        let first = vec![report("t/a", sent(1))];
        let second = vec![
            report("t/a", lost()),
            report("t/c", DatasetOutcome::UpToDate),
        ];
        assert_eq!(
            outcomes(&merge_attempts(first, second)),
            ["t/a failed", "t/c up"]
        );
    }

    #[test]
    fn refusals_are_not_retried() {
        let refused = DatasetOutcome::Failed(ReplError::Skipped("parent failed".into()));
        assert!(transient_failures(&[report("t/a", refused)]).is_empty());
    }
}
