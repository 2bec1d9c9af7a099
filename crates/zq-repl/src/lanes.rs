//! Step slots. `--max-steps N` caps the steps in flight, but a cap shared by every step lets
//! N large transfers (an initial replication of N datasets, a burst of writes) take all the
//! slots while the small incrementals of every other dataset wait for them to end. So a
//! step that has sent [`BULK_BYTES`](crate::sender::BULK_BYTES) gives its slot back and
//! continues in a separate bulk lane of N slots, waiting (its `zfs send` paused) if that
//! lane is full. Small steps therefore always have N slots, however much bulk is in flight;
//! together at most 2N steps run.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The small and bulk lanes of one daemon.
#[derive(Debug)]
pub struct Lanes {
    small: Arc<Semaphore>,
    bulk: Arc<Semaphore>,
}

impl Lanes {
    /// `n` slots in each lane (at least 1).
    pub fn new(n: usize) -> Arc<Self> {
        let n = n.max(1);
        Arc::new(Lanes {
            small: Arc::new(Semaphore::new(n)),
            bulk: Arc::new(Semaphore::new(n)),
        })
    }
}

/// What one step task holds while it runs.
#[derive(Debug)]
pub struct Slot {
    lanes: Option<Arc<Lanes>>,
    _permit: Option<OwnedSemaphorePermit>,
    bulk: bool,
}

impl Slot {
    /// No limit (a one-shot run, which replicates one dataset at a time anyway).
    pub fn unlimited() -> Self {
        Slot {
            lanes: None,
            _permit: None,
            bulk: false,
        }
    }

    /// Waits for a slot in the small lane.
    pub async fn take(lanes: &Arc<Lanes>) -> Self {
        Slot {
            lanes: Some(lanes.clone()),
            // The semaphores are never closed.
            _permit: lanes.small.clone().acquire_owned().await.ok(),
            bulk: false,
        }
    }

    /// Whether this slot is in the bulk lane.
    pub fn is_bulk(&self) -> bool {
        self.bulk
    }

    /// Moves to the bulk lane: frees the small slot first, then waits for a bulk one.
    pub async fn to_bulk(&mut self) {
        if self.bulk {
            return;
        }
        if let Some(lanes) = &self.lanes {
            self._permit = None;
            self._permit = lanes.bulk.clone().acquire_owned().await.ok();
        }
        // Only now: if the wait is cancelled, the next call waits again.
        self.bulk = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn ready<F: std::future::Future>(f: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .ok()
    }

    #[tokio::test]
    async fn bulk_steps_leave_the_small_lane_free() {
        let lanes = Lanes::new(2);
        let mut bulk = Vec::new();
        for _ in 0..2 {
            let mut s = Slot::take(&lanes).await;
            s.to_bulk().await;
            assert!(s.is_bulk());
            bulk.push(s);
        }
        // Two bulk transfers run; both small slots are still free.
        let a = ready(Slot::take(&lanes)).await.expect("a small slot");
        let b = ready(Slot::take(&lanes))
            .await
            .expect("a second small slot");
        assert!(ready(Slot::take(&lanes)).await.is_none(), "only two small");
        drop((a, b));
        // A third step turning bulk frees its small slot while it waits for a bulk one.
        let mut third = Slot::take(&lanes).await;
        let _small = ready(Slot::take(&lanes))
            .await
            .expect("one small slot left");
        assert!(
            ready(third.to_bulk()).await.is_none(),
            "the bulk lane is full"
        );
        assert!(
            ready(Slot::take(&lanes)).await.is_some(),
            "the waiting bulk step gave its small slot back"
        );
        bulk.pop();
        assert!(ready(third.to_bulk()).await.is_some());
    }

    #[tokio::test]
    async fn unlimited_never_waits() {
        let mut s = Slot::unlimited();
        assert!(ready(s.to_bulk()).await.is_some());
    }
}
