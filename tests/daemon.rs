//! The daemon (`zq-send run --every`) end to end on real pools: many datasets kept current
//! at a 1 s cadence through a receiver crash, and a diverged dataset isolated from the rest.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Every `(source, target)` of a tree `tree` with children `d00..`.
fn pairs(src: &Pool, dst_root: &str, children: usize) -> Vec<(String, String)> {
    let mut v = vec![(src.ds("tree"), format!("{dst_root}/tree"))];
    for i in 0..children {
        v.push((
            src.ds(&format!("tree/d{i:02}")),
            format!("{dst_root}/tree/d{i:02}"),
        ));
    }
    v
}

/// The largest lag of any pair now, with the target's name and the newest snapshots of
/// both sides. Two `zfs` calls whatever the number of datasets: the pair with the shortest
/// names is the root of both trees.
fn lag_now(pairs: &[(String, String)]) -> (usize, String) {
    let (src_root, dst_root) = pairs.iter().min_by_key(|(s, _)| s.len()).unwrap();
    // The destination first: whatever it holds is then on the source listing too.
    let dst_tree = snapshot_tree(dst_root);
    let src_tree = snapshot_tree(src_root);
    let mut worst = (0, String::new());
    for (s, t) in pairs {
        let src = src_tree.get(s).cloned().unwrap_or_default();
        let dst = dst_tree.get(t).cloned().unwrap_or_default();
        let l = lag_of(&src, &dst);
        if l > worst.0 || worst.1.is_empty() {
            let tail = |v: &[(String, u64)]| {
                v.iter()
                    .rev()
                    .take(4)
                    .map(|(n, _)| n.clone())
                    .collect::<Vec<_>>()
            };
            worst = (
                l,
                format!(
                    "{t} (source newest {:?}, target newest {:?})",
                    tail(&src),
                    tail(&dst)
                ),
            );
        }
    }
    worst
}

/// Samples every dataset's lag once a second for `period`; returns the worst seen, with
/// when it was seen.
fn worst_lag(pairs: &[(String, String)], period: Duration) -> (usize, String) {
    let start = Instant::now();
    let mut worst = (0, String::new());
    while start.elapsed() < period {
        let (l, which) = lag_now(pairs);
        if l > worst.0 {
            worst = (l, format!("{which} at {:?} into sampling", start.elapsed()));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    worst
}

/// A 1 s daemon over a tree with `children` datasets keeps every dataset within 2
/// snapshots of its source for `steady`; after a receiver SIGKILL and restart on the same
/// address it recovers by itself and keeps its lag bounded; it stops cleanly on SIGTERM
/// and has lost no snapshot.
fn daemon_through_a_receiver_crash(test: &str, children: usize, steady: Duration) {
    let Some(_zfs) = zfs_or_skip(test) else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let allow = [(keys.send_fp.as_str(), dst.ds("b"))];
    let allow: Vec<(&str, &str)> = allow.iter().map(|(f, r)| (*f, r.as_str())).collect();
    let recv = Recv::start(&keys, &allow);
    src.create("tree");
    for i in 0..children {
        src.create(&format!("tree/d{i:02}"));
    }
    let pairs = pairs(&src, &dst.ds("b"), children);
    let daemon = Daemon::start(
        &keys,
        &recv,
        &src.ds("tree"),
        &dst.ds("b/tree"),
        &[
            "--recursive",
            "--every",
            &dur("1s"),
            "--snapshot-every",
            &dur("1s"),
        ],
    );
    // Initial replication, one dataset creation at a time on zfs-fuse.
    let dst_tree = || snapshot_tree(&dst.ds("b/tree"));
    let started = wait_for_every(Duration::from_secs(30), Duration::from_millis(500), || {
        let tree = dst_tree();
        pairs
            .iter()
            .all(|(_, t)| tree.get(t).is_some_and(|s| !s.is_empty()))
    });
    assert!(
        started,
        "initial replication did not finish:\n{}",
        daemon.log_text()
    );

    // The first snapshots of every dataset arrive together, the later ones of the
    // initial catch-up one dataset at a time (zfs-fuse creates and mounts one dataset
    // at a time): steady state starts once all have caught up. One sample within 2 is not
    // enough: the last dataset created can be 2 behind just before the source's next
    // snapshot makes it 3 (seen in CI with 20 datasets), so ask for three seconds in a row.
    let mut within = 0;
    let caught_up = wait_for_every(Duration::from_secs(30), Duration::from_millis(500), || {
        within = if lag_now(&pairs).0 <= 2 {
            within + 1
        } else {
            0
        };
        within >= 6
    });
    assert!(
        caught_up,
        "the initial catch-up did not finish: {}\n{}",
        lag_now(&pairs).1,
        daemon.log_text()
    );

    // Steady state: every dataset within 2 iterations of its source.
    let (worst, which) = worst_lag(&pairs, scaled(steady));
    assert!(
        worst <= 2,
        "{which} lagged {worst} snapshots:\n{}",
        daemon.log_text()
    );

    // The receiver crashes and comes back on the same address 1 s later. Recovered means:
    // every target holds a snapshot made after the restart (zq_ names sort by time).
    let addr = recv.addr.clone();
    recv.kill9();
    std::thread::sleep(Duration::from_secs(1));
    let recv = Recv::start_on(&keys, &allow, &addr);
    let restarted = format!(
        "zq_{}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
    let recovered = wait_for_every(Duration::from_secs(15), Duration::from_secs(1), || {
        let tree = dst_tree();
        pairs.iter().all(|(_, t)| {
            tree.get(t)
                .and_then(|s| s.last())
                .is_some_and(|(newest, _)| *newest > restarted)
        })
    });
    assert!(
        recovered,
        "no recovery after the receiver restart:\n{}",
        daemon.log_text()
    );
    // And keeping up: the backlog is sent and the lag stays bounded. Not "within 2 again":
    // after a restart every dataset carries a backlog that goes out as `-I` streams, which
    // cost the receiver a listing more each, and on zfs-fuse with 2 cores a 21-dataset tree
    // then stays 3-4 snapshots behind (issue 3's note: per-dataset pipelines are the fix).
    let mut last = (0, String::new());
    let bounded = wait_for_every(Duration::from_secs(20), Duration::from_secs(1), || {
        last = lag_now(&pairs);
        last.0 <= 5
    });
    assert!(
        bounded,
        "20 s after recovering {} still lagged {}:\n{}",
        last.1,
        last.0,
        daemon.log_text()
    );

    // SIGTERM: the daemon finishes what is in flight and exits 0.
    let log = daemon.log_text();
    assert_eq!(daemon.stop(Duration::from_secs(35)), Some(0));
    assert!(log.contains("connection lost"), "{log}");

    // Nothing was lost: one more run brings every dataset to exactly the source's list from
    // their oldest common snapshot on. Retention prunes each side's oldest on its own
    // schedule, so one side (never both) may still hold older snapshots the other pruned.
    let out = send(
        &keys,
        &recv,
        &src.ds("tree"),
        &dst.ds("b/tree"),
        &["--recursive"],
    );
    assert!(out.status.success());
    for (s, t) in &pairs {
        let (src, dst) = (snapshots(s), snapshots(t));
        let on_src = src
            .iter()
            .position(|x| dst.contains(x))
            .unwrap_or_else(|| panic!("{t} shares no snapshot with {s}"));
        let on_dst = dst.iter().position(|x| *x == src[on_src]).unwrap_or(0);
        assert_eq!(dst[on_dst..], src[on_src..], "{t}");
        assert!(
            on_src == 0 || on_dst == 0,
            "{t}: both sides hold older snapshots the other lacks: {src:?} vs {dst:?}"
        );
    }
}

#[test]
fn daemon_keeps_datasets_current_through_a_receiver_crash() {
    daemon_through_a_receiver_crash("daemon_receiver_crash", 5, Duration::from_secs(10));
}

/// Issue 3's acceptance criterion: 20 datasets (and their parent) at 1 s.
#[test]
fn daemon_keeps_20_datasets_current_through_a_receiver_crash() {
    daemon_through_a_receiver_crash("daemon_20_datasets", 20, Duration::from_secs(30));
}

#[test]
fn a_diverged_dataset_is_reported_and_the_others_keep_replicating() {
    let Some(_zfs) = zfs_or_skip("daemon_divergence") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.ds("b"))]);
    src.create("tree");
    for i in 0..3 {
        src.create(&format!("tree/d{i:02}"));
    }
    let pairs = pairs(&src, &dst.ds("b"), 3);
    let daemon = Daemon::start(
        &keys,
        &recv,
        &src.ds("tree"),
        &dst.ds("b/tree"),
        &[
            "--recursive",
            "--every",
            &dur("1s"),
            "--snapshot-every",
            &dur("1s"),
        ],
    );
    assert!(
        wait_for(Duration::from_secs(20), || pairs
            .iter()
            .all(|(_, t)| !snapshots(t).is_empty())),
        "initial replication did not finish:\n{}",
        daemon.log_text()
    );
    // Someone changes one replica and snapshots it: it diverges from its source. (A
    // snapshot of unchanged data is not a divergence to zfs receive: it keeps it in the
    // chain, see docs/operations.md.)
    let diverged = dst.ds("b/tree/d01");
    dst.write("b/tree/d01", "local-change", 1_000, 7);
    zfs(&["snapshot", &format!("{diverged}@local")]);
    // A snapshot period or three: the daemon's attempts on d01 fail as diverged.
    std::thread::sleep(scaled(Duration::from_secs(3)));
    let others: Vec<_> = pairs
        .iter()
        .filter(|(_, t)| *t != diverged)
        .cloned()
        .collect();
    let before: Vec<usize> = others.iter().map(|(_, t)| snapshots(t).len()).collect();
    let (worst, which) = worst_lag(&others, scaled(Duration::from_secs(5)));
    assert!(worst <= 2, "{which} lagged {worst}:\n{}", daemon.log_text());
    for ((_, t), n) in others.iter().zip(before) {
        assert!(snapshots(t).len() > n, "{t} stopped replicating");
    }
    // The diverged replica was left alone (no --force) and the failure is reported.
    assert_eq!(snapshots(&diverged).last().unwrap().0, "local");
    let log = daemon.log_text();
    assert!(
        log.contains("tree/d01") && log.contains("diverged"),
        "divergence not reported:\n{log}"
    );
    // `zq-send status` shows the same: the diverged dataset's error, the others current.
    let status = daemon.status();
    assert_eq!(status["connected"], true, "{status}");
    for d in status["datasets"].as_array().unwrap() {
        let (target, error) = (d["target"].as_str().unwrap(), &d["error"]);
        if target == diverged {
            assert!(error.as_str().unwrap().contains("diverged"), "{d}");
        } else {
            assert!(error.is_null(), "{d}");
            // A few of the daemon's (scaled) periods.
            assert!(
                d["lag_seconds"].as_f64().unwrap() < 5.0 * time_scale(),
                "{d}"
            );
        }
    }
    assert_eq!(daemon.stop(Duration::from_secs(35)), Some(0));
}

#[test]
fn retention_prunes_old_zq_snapshots_on_both_sides_and_keeps_the_chain() {
    let Some(_zfs) = zfs_or_skip("daemon_retention") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.ds("b"))]);
    src.create("tree");
    src.create("tree/d00");
    // A snapshot zq did not make: retention must never touch it.
    zfs(&["snapshot", "-r", &format!("{}@manual", src.ds("tree"))]);
    let pairs = pairs(&src, &dst.ds("b"), 1);
    let daemon = Daemon::start(
        &keys,
        &recv,
        &src.ds("tree"),
        &dst.ds("b/tree"),
        &[
            "--recursive",
            "--snapshot-every",
            &dur("1s"),
            "--keep-last",
            "3",
        ],
    );
    assert!(wait_for(Duration::from_secs(20), || pairs
        .iter()
        .all(|(_, t)| snapshots(t).len() > 2)));
    let first_zq: Vec<String> = pairs
        .iter()
        .map(|(s, _)| snapshots(s)[1].0.clone())
        .collect();
    // Two retention passes (every 5 s at this cadence).
    std::thread::sleep(scaled(Duration::from_secs(12)));
    let (worst, which) = worst_lag(&pairs, scaled(Duration::from_secs(2)));
    assert!(worst <= 2, "{which} lagged {worst}:\n{}", daemon.log_text());
    assert_eq!(daemon.stop(Duration::from_secs(35)), Some(0));
    for ((s, t), first) in pairs.iter().zip(first_zq) {
        for ds in [s, t] {
            let snaps = snapshots(ds);
            let names: Vec<&str> = snaps.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names[0], "manual", "{ds}: {names:?}");
            assert!(
                !names.contains(&first.as_str()),
                "{ds} still has {first}: {names:?}"
            );
            let zq = names.iter().filter(|n| n.starts_with("zq_")).count();
            // 3 kept, plus what was created since the last pass (one pass per 5 s), plus
            // what a pass may not destroy on the source: the former cursor, whose hold is
            // released in a batch up to 10 s later (crate::holds; seen in CI: 10), and a
            // running step's base. Never pruned, there would be one per second (16 here).
            assert!(zq <= 3 + 6 + 2, "{ds} holds {zq} zq_ snapshots: {names:?}");
        }
        // The chain holds: the destination's newest is a source snapshot.
        let newest = snapshots(t).last().unwrap().1;
        assert!(snapshots(s).iter().any(|(_, g)| *g == newest), "{t}");
    }
}

/// A bit flipped between `zfs send` and the wire (a fault point of debug builds, which the
/// tests run) is caught by the receiver's BLAKE3 check before `zfs receive` gets that chunk,
/// the step fails, the daemon retries it, and the replica ends identical to the source.
#[test]
fn a_corrupted_chunk_is_caught_and_the_step_retried() {
    corrupted_chunk("corrupted_chunk", 2 << 20, &[], "1", &[]);
}

/// The same with the chunks striped over 3 connections: the receiver's refusal reaches the
/// sender while it writes only to stripe streams, and the retried step completes.
#[test]
fn a_corrupted_striped_chunk_is_caught_and_the_step_retried() {
    corrupted_chunk(
        "corrupted_striped_chunk",
        12 << 20,
        &["--connections", "3"],
        // Past the first MiB: a chunk that goes over a stripe stream.
        "4194304",
        &["spreading the step's chunks"],
    );
}

/// A daemon replicating a `size`-byte full stream with the chunk at stream offset
/// `corrupt_at` damaged once; its log must say each of `logged`.
fn corrupted_chunk(test: &str, size: usize, extra: &[&str], corrupt_at: &str, logged: &[&str]) {
    let Some(_zfs) = zfs_or_skip(test) else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let ds = src.create("fs");
    src.write("fs", "f", size, 3);
    src.snap("fs", "s1");
    let target = dst.ds("fs");
    let every = dur("1s");
    let args = [&["--every", every.as_str()], extra].concat();
    let daemon = Daemon::start_with_env(
        &keys,
        &recv.addr,
        &ds,
        &target,
        &args,
        &[("ZQ_TEST_CORRUPT_ONCE", corrupt_at)],
    );
    let done = wait_for(Duration::from_secs(30), || {
        snapshots(&target) == snapshots(&ds)
    });
    let log = daemon.log_text();
    assert!(done, "{log}");
    assert!(
        log.contains("fault injection"),
        "the fault was injected: {log}"
    );
    assert!(
        log.contains("failed its BLAKE3 check"),
        "the receiver caught it: {log}"
    );
    for needle in logged {
        assert!(log.contains(needle), "{needle}: {log}");
    }
    assert_eq!(read(&target, "f"), read(&ds, "f"));
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_receiver_killed_mid_transfer_resumes_from_its_spool() {
    crash_mid_transfer("receiver_killed_mid_transfer", Crash::Receiver, &[]);
}

/// The same with the step striped over 3 connections: the daemon reconnects all three and
/// the resumed step is striped again.
#[test]
fn a_receiver_killed_mid_striped_transfer_resumes_from_its_spool() {
    crash_mid_transfer(
        "receiver_killed_mid_striped_transfer",
        Crash::Receiver,
        &["--connections", "3"],
    );
}

#[test]
fn a_sender_killed_mid_transfer_resumes_where_the_receiver_stopped() {
    crash_mid_transfer("sender_killed_mid_transfer", Crash::Sender, &[]);
}

/// Which side a crash test kills.
enum Crash {
    Receiver,
    Sender,
}

/// SIGKILL of one side in the middle of a large transfer, once the receiver has part of
/// it (in its spool, or on OpenZFS in zfs's partial receive), then a restart: the daemon
/// lists the destination, finds what the receiver kept and resumes the step, and the
/// replica ends identical (GUIDs and contents).
fn crash_mid_transfer(test: &str, crash: Crash, extra: &[&str]) {
    let Some(_zfs) = zfs_or_skip(test) else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let allow = [(keys.send_fp.as_str(), dst.name.as_str())];
    let mut recv = Recv::start(&keys, &allow);
    let ds = src.create("fs");
    src.write("fs", "big", 64 << 20, 11);
    src.snap("fs", "s1");
    let target = dst.ds("fs");
    // Both ends notice a dead peer within 3 s (the smaller idle timeout applies). At
    // 4 MB/s the step (~64 MB) lasts long enough for zfs to write part of it to the pool
    // (every transaction group, ~5 s) before the crash, where zfs keeps partial receives.
    let every = dur("1s");
    let args = [
        &[
            "--every",
            every.as_str(),
            "--idle-timeout",
            "3s",
            "--bwlimit",
            "4MB",
        ],
        extra,
    ]
    .concat();
    let mut daemon = Daemon::start(&keys, &recv, &ds, &target, &args);
    daemon.await_transferred(&keys, &dst, 8 << 20);
    assert!(receiving(&target), "the transfer ended before the crash");
    match crash {
        Crash::Receiver => {
            let addr = recv.addr.clone();
            recv.kill9();
            recv = Recv::start_on(&keys, &allow, &addr);
        }
        Crash::Sender => {
            daemon.kill9();
            daemon = Daemon::start(&keys, &recv, &ds, &target, &args);
        }
    }
    let done = wait_for(Duration::from_secs(90), || {
        snapshots(&target) == snapshots(&ds)
    });
    // The sender logs the commit once the receiver's verdict is in.
    let resumed = daemon.logs_within(Duration::from_secs(10), "resumed_bytes=");
    let log = daemon.log_text();
    assert!(done, "not replicated after the crash:\n{log}");
    assert_eq!(read(&target, "big"), read(&ds, "big"));
    assert!(resumed, "the step resumed rather than restarting:\n{log}");
    if extra.contains(&"--connections") {
        let striped = log.matches("spreading the step's chunks").count();
        assert!(striped >= 2, "striped before and after the crash:\n{log}");
    }
    assert!(
        wait_for(Duration::from_secs(5), || spooled(&keys) == 0),
        "the spool is removed once the step committed"
    );
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0));
    drop(recv);
}

/// The connection is lost twice in the middle of a large transfer, each time for longer
/// than its idle timeout: each time the daemon reconnects, finds what the receiver kept
/// (its spool, or zfs's partial receive) in its listing and resumes the step from there.
#[test]
fn a_transfer_cut_twice_for_longer_than_the_idle_timeout_resumes_each_time() {
    let Some(_zfs) = zfs_or_skip("cut_and_resume") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let relay = Relay::start(&recv.addr);
    let ds = src.create("fs");
    src.write("fs", "big", 64 << 20, 17);
    src.snap("fs", "s1");
    let target = dst.ds("fs");
    // At 4 MB/s the stream (~64 MB) takes 16 s, so both cuts land mid-transfer whatever
    // the receiver had buffered when the first one came, and whether the first is seen in
    // the spool at once or in the pool once zfs writes a transaction group (OpenZFS).
    let args = [
        "--every",
        &dur("1s"),
        "--idle-timeout",
        "2s",
        "--bwlimit",
        "4MB",
    ];
    let daemon = Daemon::start_with_env(&keys, &relay.addr, &ds, &target, &args, &[]);
    let mut at = 8u64 << 20;
    for cut in 0..2 {
        daemon.await_transferred(&keys, &dst, at);
        relay.cut(true);
        // Longer than the idle timeout, and than 3 PTOs (quinn's floor for it), which
        // grow with the round trips of a slow (emulated) guest: scaled.
        std::thread::sleep(scaled(Duration::from_secs(4)));
        relay.cut(false);
        if cut == 0 {
            // The second cut comes once the resumed step has gone further.
            assert!(
                wait_for(Duration::from_secs(30), || resumes(&daemon.log_text()) >= 1),
                "{}",
                daemon.log_text()
            );
            at = spooled(&keys).max(allocated(&dst.name)) + (4 << 20);
        }
    }
    let done = wait_for(Duration::from_secs(90), || {
        snapshots(&target) == snapshots(&ds)
    });
    let resumed = daemon.logs_within(Duration::from_secs(10), "resumed_bytes=");
    let log = daemon.log_text();
    assert!(done, "not replicated after the cuts:\n{log}");
    assert_eq!(read(&target, "big"), read(&ds, "big"));
    assert!(resumes(&log) >= 2, "both cuts were resumed:\n{log}");
    assert!(resumed, "{log}");
    assert!(wait_for(Duration::from_secs(5), || spooled(&keys) == 0));
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0));
}

/// How many times the sender's log says it resumed a step (from the receiver's spool, or
/// from zfs's partial receive with `zfs send -t`).
fn resumes(log: &str) -> usize {
    log.matches("resuming the step where the receiver's spool ends")
        .count()
        + log
            .matches("resuming the receiver's partial receive")
            .count()
}

/// A bit flipped in the spool file while the connection is down (the receiver kept
/// running): whichever side notices first — the sender, whose regenerated prefix does not
/// match a token hashed from the changed file, or the receiver, which checks the file
/// again before replaying it (when its token was hashed before the change; unit-tested in
/// receiver/spool.rs) — the resume is refused and the step sent afresh. The corrupted
/// bytes never reach zfs receive. (On OpenZFS with `--resume-with spool`.)
#[test]
fn a_corrupted_spool_is_refused_and_the_step_sent_afresh() {
    let Some(_zfs) = zfs_or_skip("corrupted_spool") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start_with_args(
        &keys,
        &[(&keys.send_fp, &dst.name)],
        &["--resume-with", "spool"],
    );
    let relay = Relay::start(&recv.addr);
    let ds = src.create("fs");
    src.write("fs", "big", 64 << 20, 19);
    src.snap("fs", "s1");
    let target = dst.ds("fs");
    let args = ["--every", &dur("1s"), "--idle-timeout", "2s"];
    let daemon = Daemon::start_with_env(&keys, &relay.addr, &ds, &target, &args, &[]);
    daemon.await_spooled(&keys, 8 << 20);
    relay.cut(true);
    // Both sides give the connection up after 2 s (or 3 PTOs, which grow with the round
    // trips of a slow guest: scaled); the receiver keeps its spool.
    std::thread::sleep(scaled(Duration::from_secs(3)));
    flip_a_spooled_bit(&keys, 5 << 20);
    std::thread::sleep(Duration::from_secs(1));
    relay.cut(false);
    let done = wait_for(Duration::from_secs(90), || {
        snapshots(&target) == snapshots(&ds)
    });
    daemon.logs_within(Duration::from_secs(10), "step committed");
    let log = daemon.log_text();
    assert!(done, "not replicated after the corruption:\n{log}");
    assert_eq!(read(&target, "big"), read(&ds, "big"));
    assert!(
        log.contains("does not match the receiver's spool")
            || log.contains("do not match the sender's hash"),
        "the corrupted spool was not refused:\n{log}"
    );
    assert!(!log.contains("resumed_bytes="), "{log}");
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0));
}

/// A receiver that stops reading in the middle of a step while its connection stays alive
/// (a debug-build fault point makes zq-recv stop reading the step's stream for 10 s once
/// it has 8 MiB; it keeps serving everything else): the sender's memory stays bounded by
/// QUIC's flow control, after `--stall-timeout` the step is abandoned with an error that
/// says so, and the retry resumes from the receiver's spool.
#[test]
fn a_receiver_that_stops_reading_is_timed_out_and_the_step_resumes() {
    let Some(_zfs) = zfs_or_skip("stalled_receiver") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let allow = [(keys.send_fp.as_str(), dst.name.as_str())];
    let stall = [("ZQ_TEST_STALL_ONCE", "10")];
    let recv = Recv::start_with_env(&keys, &allow, "127.0.0.1:0", &stall);
    let ds = src.create("fs");
    src.write("fs", "big", 64 << 20, 29);
    src.snap("fs", "s1");
    let target = dst.ds("fs");
    let args = ["--every", &dur("1s"), "--stall-timeout", "3s"];
    let daemon = Daemon::start(&keys, &recv, &ds, &target, &args);
    let mut peak = 0;
    let stalled = wait_for(Duration::from_secs(60), || {
        peak = peak.max(rss(daemon.pid()));
        daemon
            .log_text()
            .contains("accepted none of the step's data")
    });
    assert!(stalled, "the stall was not noticed:\n{}", daemon.log_text());
    // What waits is the stream's send window (16 MiB) and zq's own buffers.
    eprintln!(
        "zq-send peak RSS while the receiver stalled: {} MiB",
        peak >> 20
    );
    assert!(peak < 128 << 20, "zq-send grew to {} MiB", peak >> 20);
    let done = wait_for(Duration::from_secs(90), || {
        snapshots(&target) == snapshots(&ds)
    });
    let resumed = daemon.logs_within(Duration::from_secs(10), "resumed_bytes=");
    let log = daemon.log_text();
    assert!(done, "not replicated after the stall:\n{log}");
    assert_eq!(read(&target, "big"), read(&ds, "big"));
    assert!(resumed, "the step resumed:\n{log}");
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0));
}

/// Flips one bit at `offset` of the (only) spool file.
fn flip_a_spooled_bit(keys: &Keys, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = format!("{}/spool", keys.path());
    let path = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "zs"))
        .expect("a spool file");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut byte).unwrap();
    byte[0] ^= 0x10;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&byte).unwrap();
}

/// Network outages in the middle of a large transfer, shorter than the connection's idle
/// timeout (30 s): QUIC retransmits once the path is back, the step carries on where it
/// was, and the replica ends identical. (Longer outages end the connection; the daemon
/// reconnects and the step starts again, as after a crash.)
#[test]
fn outages_in_the_middle_of_a_transfer_lose_nothing() {
    let Some(_zfs) = zfs_or_skip("outages_mid_transfer") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let relay = Relay::start(&recv.addr);
    let ds = src.create("fs");
    src.write("fs", "big", 64 << 20, 13);
    src.snap("fs", "s1");
    let target = dst.ds("fs");
    // At 16 MB/s the 64 MiB take 4 s of sending, so three outages fall inside the
    // transfer however fast the data path gets (unthrottled, it can finish in the 0.7 s
    // between two outages).
    let daemon = Daemon::start_with_env(
        &keys,
        &relay.addr,
        &ds,
        &target,
        &["--every", &dur("1s"), "--bwlimit", "16MB"],
        &[],
    );
    assert!(
        wait_for(Duration::from_secs(30), || receiving(&target)),
        "the transfer never started:\n{}",
        daemon.log_text()
    );
    let mut cuts = 0;
    while cuts < 3 && receiving(&target) {
        relay.cut(true);
        std::thread::sleep(Duration::from_secs(2));
        relay.cut(false);
        cuts += 1;
        std::thread::sleep(Duration::from_millis(700));
    }
    assert!(cuts >= 2, "the transfer ended before two outages");
    let done = wait_for(Duration::from_secs(90), || {
        snapshots(&target) == snapshots(&ds)
    });
    let log = daemon.log_text();
    assert!(done, "not replicated after the outages:\n{log}");
    assert_eq!(read(&target, "big"), read(&ds, "big"));
    assert!(
        !log.contains("connection lost") && !log.contains("reconnect"),
        "the step survived the outages without a reconnect:\n{log}"
    );
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0));
}

/// An outage longer than the connection's idle timeout (30 s): the connection dies, the
/// daemon reconnects once the path is back, resuming the TLS session with its Hello in
/// 0-RTT (the receiver kept running), and catches up.
#[test]
fn after_a_long_outage_the_daemon_reconnects_in_0rtt_and_catches_up() {
    let Some(_zfs) = zfs_or_skip("long_outage") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let relay = Relay::start(&recv.addr);
    let ds = src.create("fs");
    let target = dst.ds("fs");
    let args = ["--every", &dur("1s"), "--snapshot-every", &dur("1s")];
    let daemon = Daemon::start_with_env(&keys, &relay.addr, &ds, &target, &args, &[]);
    assert!(
        wait_for(Duration::from_secs(20), || snapshots(&target).len() >= 2),
        "no replication before the outage:\n{}",
        daemon.log_text()
    );
    relay.cut(true);
    std::thread::sleep(Duration::from_secs(36));
    relay.cut(false);
    let caught_up = wait_for(Duration::from_secs(30), || lag(&ds, &target) <= 2);
    let log = daemon.log_text();
    assert!(caught_up, "did not catch up after the outage:\n{log}");
    assert!(
        log.contains("connection lost"),
        "the connection died:\n{log}"
    );
    let handshakes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("handshake complete"))
        .collect();
    assert!(
        handshakes.len() >= 2 && handshakes[1..].iter().any(|l| l.contains("early=true")),
        "the reconnect resumed the session in 0-RTT:\n{log}"
    );
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0));
}

/// A daemon that does not make the snapshots replicates those another tool makes, in the
/// changed dataset only. Where zfs has `snapshots_changed` (OpenZFS >= 2.2; asked of the
/// platform, not assumed), it finds them by listing only the dataset that changed.
#[test]
fn a_daemon_replicates_what_another_tool_snapshots_listing_only_what_changed() {
    let Some(_zfs) = zfs_or_skip("snapshots_changed_daemon") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let root = tree_of_three(&src, "s0");
    let changed_known = snapshots_changed_known(&root);
    let target = dst.ds("tree");
    let daemon = Daemon::start_with_env(
        &keys,
        &recv.addr,
        &root,
        &target,
        &["--recursive", "--every", &dur("1s")],
        &[("ZQ_LOG", "info,zq_repl::daemon=debug")],
    );
    let (b, target_b) = (src.ds("tree/b"), dst.ds("tree/b"));
    assert!(
        wait_for(Duration::from_secs(60), || snapshot_tree(&target).len()
            == 4
            && snapshot_tree(&target).values().all(|s| s.len() == 1)),
        "the tree was not replicated:\n{}",
        daemon.log_text()
    );
    for i in 1..=3 {
        src.snap("tree/b", &format!("s{i}"));
        assert!(
            wait_for(Duration::from_secs(30), || snapshots(&target_b)
                == snapshots(&b)),
            "s{i} not replicated:\n{}",
            daemon.log_text()
        );
    }
    assert_eq!(snapshots(&dst.ds("tree/a")).len(), 1);
    let log = daemon.log_text();
    if changed_known {
        assert!(
            log.lines()
                .any(|l| l.contains("source listed by snapshots_changed") && l.contains("stale=1")),
            "the daemon did not list by snapshots_changed:\n{log}"
        );
    } else {
        eprintln!("this zfs has no snapshots_changed: the daemon lists every dataset");
    }
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0));
}

/// A daemon started on a tree that is already replicated lists both sides once (side by
/// side) and starts every dataset in its first pass: a child does not wait for a later
/// tick to learn that its parent's target exists. With a period of an hour there is no
/// later tick: the tree and the status file must be current without one.
#[test]
fn a_daemon_on_a_replicated_tree_brings_every_dataset_up_to_date_in_its_first_pass() {
    let Some(_zfs) = zfs_or_skip("first_pass") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let root = tree_of_three(&src, "s1");
    let target = dst.ds("tree");
    let out = send(&keys, &recv, &root, &target, &["--recursive"]);
    assert!(out.status.success(), "{}", stderr(&out));
    zfs(&["snapshot", "-r", &format!("{root}@s2")]);

    let daemon = Daemon::start(
        &keys,
        &recv,
        &root,
        &target,
        &["--recursive", "--every", "1h"],
    );
    let current = || {
        snapshot_tree(&target).len() == 4
            && snapshot_tree(&target)
                .values()
                .all(|s| s.last().is_some_and(|(n, _)| n == "s2"))
    };
    assert!(
        wait_for(Duration::from_secs(60), current),
        "the tree did not reach s2 without a second tick:\n{}",
        daemon.log_text()
    );
    let replicated = |status: &serde_json::Value| {
        status["datasets"]
            .as_array()
            .map_or(0, |d| d.iter().filter(|d| d["replicated"] == "s2").count())
    };
    assert!(
        wait_for(Duration::from_secs(10), || replicated(&daemon.status())
            == 4),
        "the status file is behind: {}",
        daemon.status()
    );
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0));
}

/// Whether this zfs keeps `snapshots_changed` for `dataset` (OpenZFS >= 2.2).
fn snapshots_changed_known(dataset: &str) -> bool {
    std::process::Command::new("zfs")
        .args(["get", "-Hp", "-o", "value", "snapshots_changed", dataset])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() != "-")
}

/// Where OpenZFS reports its events (`zpool events`, with `snapshots_changed` to say
/// where), a daemon learns of a snapshot another tool makes as zfs makes it: with a period
/// of an hour, the snapshot is replicated within seconds, not at the next tick.
#[test]
fn a_snapshot_another_tool_makes_is_replicated_at_once_where_zfs_reports_events() {
    let Some(_zfs) = zfs_or_skip("snapshot_events") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let ds = src.create("fs");
    src.snap("fs", "s0");
    if !snapshots_changed_known(&ds) {
        eprintln!("this zfs has no snapshots_changed: the daemon finds snapshots on ticks");
        return;
    }
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let target = dst.ds("fs");
    let daemon = Daemon::start(&keys, &recv, &ds, &target, &["--every", "1h"]);
    assert!(
        wait_for(Duration::from_secs(60), || snapshots(&target).len() == 1),
        "s0 was not replicated:\n{}",
        daemon.log_text()
    );
    for i in 1..=2 {
        src.snap("fs", &format!("s{i}"));
        assert!(
            wait_for(Duration::from_secs(10), || snapshots(&target)
                == snapshots(&ds)),
            "s{i} waited for a tick:\n{}",
            daemon.log_text()
        );
    }
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0));
}

/// `tree` with children a, b and c in `src`, snapshotted recursively as `snap`.
fn tree_of_three(src: &Pool, snap: &str) -> String {
    let root = src.create("tree");
    for child in ["a", "b", "c"] {
        src.create(&format!("tree/{child}"));
    }
    zfs(&["snapshot", "-r", &format!("{root}@{snap}")]);
    root
}
