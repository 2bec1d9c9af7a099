//! The daemon's supervisor: one job, the connection it replicates over (re-established
//! with capped, jittered backoff when it breaks), and the loops it starts and stops.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};
use zq_store::DatasetName;

use crate::connector::Connector;
use crate::error::chain;
use crate::lanes::Lanes;
use crate::retry::{pseudo_random, Backoff};
use crate::sender::{Job, Sender};

use super::scheduler::{Done, State, Told, Work};
use super::snapshots::snapshot_loop;
use super::DaemonOptions;
use crate::prune::{retention_loop, Cursors};

/// Runs the job until `shutdown` turns true, then lets the steps in flight finish (up to
/// 30 s) and returns.
pub async fn run(
    job: Job,
    opts: DaemonOptions,
    connector: Arc<Connector>,
    mut shutdown: watch::Receiver<bool>,
) {
    let zfs = connector.zfs().clone();
    let (made_tx, mut made) = mpsc::unbounded_channel();
    // The datasets the filter keeps, from the latest listing (for the snapshot loop).
    let (included_tx, included_rx) = watch::channel(None::<Vec<DatasetName>>);
    let mut snapshots = None;
    if let Some(every) = opts.snapshot_every {
        snapshots = Some(tokio::spawn(snapshot_loop(
            zfs.clone(),
            job.clone(),
            every,
            made_tx,
            included_rx,
            shutdown.clone(),
        )));
    }
    if !opts.jitter.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(pseudo_random(opts.jitter)) => {}
            _ = shutdown.changed() => return,
        }
    }
    // Where zq does not make the snapshots, OpenZFS tells as each one is made: a pass
    // starts at once rather than at the next tick (events that come during a pass wake
    // one more pass, not one each).
    let woken = Arc::new(Notify::new());
    let told = Arc::new(Told::default());
    let events = match opts.snapshot_every {
        None => zfs.follow_snapshots(&job.source).map(|mut events| {
            let (woken, told) = (woken.clone(), told.clone());
            told.following.store(true, Ordering::Relaxed);
            tokio::spawn(async move {
                while let Some(event) = events.next().await {
                    debug!(?event, "zpool events");
                    told.event(event);
                    woken.notify_one();
                }
                told.following.store(false, Ordering::Relaxed);
                warn!("zpool events -f ended: new snapshots are found on ticks only");
            })
        }),
        Some(_) => None,
    };
    let (cursors_tx, cursors_rx) = watch::channel(Cursors::new());
    let (conn_tx, conn_rx) = watch::channel(None::<Arc<Sender>>);
    if let Some(m) = &opts.metrics {
        m.watch_sender(conn_tx.subscribe());
    }
    let mut retention = None;
    if !opts.retention.is_off() {
        // Every 5 periods (at least 5 s), or less often when N is large: a pass lists the
        // whole source tree, which costs time per snapshot, and waiting until a quarter of N
        // new snapshots may exist loses nothing.
        let keep = [
            opts.retention.source.keep_last,
            opts.retention.target.keep_last,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(0);
        let fill =
            opts.snapshot_every.unwrap_or(opts.every) * u32::try_from(keep / 4).unwrap_or(u32::MAX);
        let every = (opts.every * 5).max(Duration::from_secs(5)).max(fill);
        retention = Some(tokio::spawn(retention_loop(
            zfs.clone(),
            job.clone(),
            opts.retention.clone(),
            every,
            cursors_rx,
            conn_rx,
            shutdown.clone(),
        )));
    }
    let mut tick = tokio::time::interval(opts.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sender: Option<Arc<Sender>> = None;
    let mut backoff = Backoff::reconnect();
    let mut state = State {
        included: Some(included_tx),
        told: Some(told),
        ..State::default()
    };
    let mut created = Vec::new();
    // Every dataset's step runs as its own task; a dataset whose step ends starts its next
    // one at once, without waiting for the others (a large transfer holds up nothing but
    // its own dataset).
    let mut steps: JoinSet<(DatasetName, Done)> = JoinSet::new();
    let lanes = Lanes::new(opts.max_steps);
    let mut status_written = Instant::now();
    loop {
        let mut lost = false;
        // A tick or a new snapshot may list (plan); a finished step only continues.
        let mut plan = true;
        tokio::select! {
            _ = tick.tick() => {}
            _ = woken.notified() => state.woken = true,
            Some(name) = made.recv() => created.push(name),
            Some(done) = steps.join_next_with_id(), if !steps.is_empty() => {
                lost |= state.finished(done);
                plan = false;
            }
            // Outcomes recorded since the last write (held back to once a second) are
            // published within a second, not at the next tick, which may be an hour away.
            _ = tokio::time::sleep_until((status_written + Duration::from_secs(1)).into()),
                if state.recorded_at.is_some_and(|r| r > status_written) => {
                state.write_status(&opts, sender.is_some());
                status_written = Instant::now();
                continue;
            }
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
        while let Ok(name) = made.try_recv() {
            created.push(name);
        }
        while let Some(done) = steps.try_join_next_with_id() {
            lost |= state.finished(done);
        }
        // A step that lost its connection may have run on an earlier one.
        if lost && sender.as_ref().is_some_and(|s| !s.is_connected()) {
            sender = None;
            disconnected(&mut backoff, &conn_tx);
        }
        let s = match &sender {
            Some(s) => s.clone(),
            None if Instant::now() < backoff.next_try() => {
                state.write_status(&opts, false);
                continue;
            }
            None => match connector.connect().await {
                Ok(s) => {
                    info!("connected to the receiver");
                    backoff.succeeded();
                    let s = Arc::new(s);
                    sender = Some(s.clone());
                    let _ = conn_tx.send(Some(s.clone()));
                    s
                }
                Err(e) => {
                    let delay = backoff.failed();
                    warn!(error = %chain(&e), retry_in = %humantime::format_duration(delay), "cannot reach the receiver");
                    state.write_status(&opts, false);
                    continue;
                }
            },
        };
        // A planning pass may list the whole tree (seconds at 1,000 datasets): publish
        // what the steps that just ended did first, not after it.
        if plan && state.recorded_at.is_some_and(|r| r > status_written) {
            state.write_status(&opts, true);
            status_written = Instant::now();
        }
        let work = Work {
            sender: &s,
            zfs: &zfs,
            job: &job,
            opts: &opts,
            lanes: &lanes,
        };
        let lost = {
            let schedule = state.schedule(work, std::mem::take(&mut created), plan, &mut steps);
            tokio::pin!(schedule);
            tokio::select! {
                lost = &mut schedule => lost,
                _ = shutdown.changed() => break,
            }
        };
        // A step that lost its connection may have run on an earlier one.
        if lost && sender.as_ref().is_some_and(|s| !s.is_connected()) {
            sender = None;
            disconnected(&mut backoff, &conn_tx);
        }
        if state.in_flight.is_empty() {
            // Retention starts when no step runs, so its zfs calls do not compete with them.
            let _ = cursors_tx.send(state.cursors());
        }
        // On every tick, and after steps at most once a second: with hundreds of datasets
        // steps end many times a second, and each write serializes every dataset.
        if plan || status_written.elapsed() >= Duration::from_secs(1) {
            state.write_status(&opts, sender.is_some());
            status_written = Instant::now();
        }
    }
    if !steps.is_empty() {
        info!("stopping: letting the steps in flight finish");
        let finish = async {
            while let Some(done) = steps.join_next_with_id().await {
                state.finished(done);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(30), finish).await;
        // Whatever is left is aborted: its zfs processes are killed (kill on drop).
        steps.shutdown().await;
    }
    // `zq-send status` then says stopped, not connected (`--remove-stopped` removes it).
    state.write_stopped(&opts);
    for t in [snapshots, retention, events].into_iter().flatten() {
        t.abort();
    }
    drop(sender);
    info!("daemon stopped");
}

/// The connection broke: wait before reconnecting, and tell the retention loop.
fn disconnected(backoff: &mut Backoff, conn: &watch::Sender<Option<Arc<Sender>>>) {
    let delay = backoff.failed();
    warn!(
        retry_in = %humantime::format_duration(delay),
        "connection lost; reconnecting"
    );
    let _ = conn.send(None);
}
