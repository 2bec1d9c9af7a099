//! The receiver's per-step listings, batched: every step lists its target before (and, with
//! intermediates, after) `zfs receive`, and on zfs-fuse the `zfs` process costs more than
//! the listing itself. Requests that arrive while a listing runs wait for it to end and then
//! go out together as one `zfs get -d1 T1 T2 …`; a lone request goes out at once, so a single
//! step waits for nothing.
//!
//! Freshness is unchanged: every listing starts after its request, and a step holds its
//! target's lock from before the request until after its commit, so no listing can predate a
//! commit it should see.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::debug;
use zq_store::{DatasetName, DatasetState, StoreError, Zfs};

type Reply = oneshot::Sender<Result<Vec<DatasetState>, StoreError>>;

/// Batches [`Zfs::list`] (not recursive) calls; see the module docs.
#[derive(Debug)]
pub(super) struct Lister {
    zfs: Zfs,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<(DatasetName, Reply)>,
    /// Whether a task is draining `pending`.
    running: bool,
}

/// At most this many datasets per `zfs` invocation.
const MAX_BATCH: usize = 32;

impl Lister {
    pub(super) fn new(zfs: Zfs) -> Arc<Self> {
        Arc::new(Lister {
            zfs,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a queue of replies: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `Zfs::list(target, false)` returns, possibly from a listing shared with other
    /// targets. The listing runs in its own task, so a step that is cancelled meanwhile
    /// cannot strand the others waiting on it.
    pub(super) async fn list(
        self: &Arc<Self>,
        target: &DatasetName,
    ) -> Result<Vec<DatasetState>, StoreError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = self.state();
            s.pending.push((target.clone(), tx));
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            tokio::spawn(self.clone().drain());
        }
        match rx.await {
            Ok(r) => r,
            // The draining task died (runtime shutting down): list alone.
            Err(_) => self.zfs.list(target, false).await,
        }
    }

    async fn drain(self: Arc<Self>) {
        // Should this task end abnormally (a panic), the next request starts another.
        struct Abort(Option<Arc<Lister>>);
        impl Drop for Abort {
            fn drop(&mut self) {
                if let Some(l) = self.0.take() {
                    l.state().running = false;
                }
            }
        }
        let mut abort = Abort(Some(self.clone()));
        loop {
            let batch: Vec<_> = {
                let mut s = self.state();
                if s.pending.is_empty() {
                    // In the same critical section as the check: a request pushed after it
                    // sees `running` false and starts a new task.
                    s.running = false;
                    abort.0 = None;
                    return;
                }
                let n = s.pending.len().min(MAX_BATCH);
                s.pending.drain(..n).collect()
            };
            self.serve(batch).await;
        }
    }

    async fn serve(&self, batch: Vec<(DatasetName, Reply)>) {
        if batch.len() > 1 {
            let names: Vec<DatasetName> = batch.iter().map(|(n, _)| n.clone()).collect();
            debug!(targets = names.len(), "batched listing");
            match self.zfs.list_each(&names).await {
                Ok(states) if states.len() == batch.len() => {
                    for ((_, reply), state) in batch.into_iter().zip(states) {
                        let _ = reply.send(Ok(state));
                    }
                    return;
                }
                // E.g. one target does not exist: each is listed on its own below, so
                // that error (or an empty listing) goes to the step it belongs to.
                Ok(_) => debug!("batched listing returned a wrong count; listing one by one"),
                Err(e) => debug!(error = %e, "batched listing failed; listing one by one"),
            }
        }
        for (name, reply) in batch {
            let _ = reply.send(self.zfs.list(&name, false).await);
        }
    }
}
