//! Dataset filters of recursive jobs on real pools: `--exclude`, `--exclude-regex`,
//! `--include-regex`, `--exclude-property` and `--skip-parent`, once and in a daemon that
//! makes its own snapshots (excluded datasets get none).

mod common;

use std::time::Duration;

use common::*;

/// Names under `root`, relative to it ("" for the root).
fn relative(root: &str) -> Vec<String> {
    datasets(root)
        .into_iter()
        .map(|d| {
            d.strip_prefix(root)
                .unwrap_or(&d)
                .trim_start_matches('/')
                .to_string()
        })
        .collect()
}

#[test]
fn a_recursive_run_replicates_only_what_the_filters_keep() {
    let Some(_zfs) = zfs_or_skip("a_recursive_run_replicates_only_what_the_filters_keep") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("fs"), Pool::new("fd"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    for d in [
        "t",
        "t/a",
        "t/a/cache",
        "t/b",
        "t/tmp",
        "t/tmp/x",
        "t/c",
        "t/c/d",
    ] {
        src.create(d);
    }
    zfs(&["set", "zq:replicate=off", &src.ds("t/c")]);
    zfs(&["snapshot", "-r", &format!("{}@s1", src.ds("t"))]);
    let root = src.ds("t");
    let target = dst.ds("t");
    let out = send(
        &keys,
        &recv,
        &root,
        &target,
        &[
            "--recursive",
            "--exclude",
            "tmp",
            "--exclude-regex",
            ".*/cache",
            "--exclude-property",
            "zq:replicate=off",
            "--skip-parent",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // The target root exists only as the parent the receiver created for a and b.
    assert_eq!(relative(&target), ["", "a", "b"]);
    assert!(snapshots(&target).is_empty());
    assert_eq!(snapshots(&dst.ds("t/a")), snapshots(&src.ds("t/a")));

    // Everything excluded: said, and nothing sent.
    let out = send(
        &keys,
        &recv,
        &root,
        &target,
        &["--recursive", "--include-regex", "nothing/.*"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("every dataset of"),
        "{}",
        stderr(&out)
    );

    // Bad filters are usage errors naming the flag.
    let out = send(&keys, &recv, &root, &target, &["--exclude-regex", "x"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--exclude-regex needs --recursive"
    );
    let out = send(
        &keys,
        &recv,
        &root,
        &target,
        &["-r", "--exclude-regex", "("],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--exclude-regex"), "{}", stderr(&out));
    let out = send(&keys, &recv, &root, &target, &["-r", "--exclude", &root]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("use --skip-parent"),
        "{}",
        stderr(&out)
    );
}

/// A daemon making its own snapshots of a filtered tree: the kept datasets are snapshotted
/// and replicated; the excluded one gets no zq_ snapshot at all.
#[test]
fn a_filtered_daemon_snapshots_and_replicates_only_kept_datasets() {
    let Some(_zfs) = zfs_or_skip("a_filtered_daemon_snapshots_only_kept_datasets") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("gs"), Pool::new("gd"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    for d in ["t", "t/a", "t/b", "t/scratch"] {
        src.create(d);
    }
    let root = src.ds("t");
    let target = dst.ds("t");
    let daemon = Daemon::start(
        &keys,
        &recv,
        &root,
        &target,
        &[
            "--recursive",
            "--snapshot-every",
            &dur("1s"),
            "--include-regex",
            &format!("{root}(/a|/b)?"),
        ],
    );
    let synced = |d: &str| {
        let s = snapshots(&src.ds(d));
        !s.is_empty() && snapshots(&dst.ds(d)) == s
    };
    assert!(
        wait_for(Duration::from_secs(60), || ["t", "t/a", "t/b"]
            .iter()
            .all(|d| synced(d))),
        "not replicated:\n{}",
        daemon.log_text()
    );
    drop(daemon);
    assert!(snapshots(&src.ds("t/scratch")).is_empty());
    assert_eq!(relative(&target), ["", "a", "b"]);
}

/// Only the snapshots a filter keeps reach the destination, though others lie between
/// them (steps are `-i` chains, never `-I`), and later runs continue from the newest kept.
#[test]
fn only_the_snapshots_the_filter_keeps_are_replicated() {
    let Some(_zfs) = zfs_or_skip("only_the_snapshots_the_filter_keeps_are_replicated") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("ss"), Pool::new("sd"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let fs = src.create("fs");
    for (i, snap) in [
        "hourly_1",
        "frequent_1",
        "hourly_2",
        "frequent_2",
        "hourly_3",
    ]
    .iter()
    .enumerate()
    {
        src.write("fs", &format!("f{i}"), 20_000, i as u64);
        src.snap("fs", snap);
    }
    let target = dst.ds("fs");
    let names = |d: &str| -> Vec<String> { snapshots(d).into_iter().map(|(n, _)| n).collect() };
    let filter = ["--include-snapshots", "hourly_.*"];
    let out = send(&keys, &recv, &fs, &target, &filter);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(names(&target), ["hourly_1", "hourly_2", "hourly_3"]);

    src.write("fs", "g", 20_000, 9);
    src.snap("fs", "frequent_3");
    src.snap("fs", "hourly_4");
    let out = send(
        &keys,
        &recv,
        &fs,
        &target,
        &["--exclude-snapshots", "frequent_.*"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        names(&target),
        ["hourly_1", "hourly_2", "hourly_3", "hourly_4"]
    );
    assert_eq!(read(&target, "g"), read(&fs, "g"));

    // A daemon whose own zq_ snapshots the filter would leave out: refused at start.
    let out = send(
        &keys,
        &recv,
        &fs,
        &target,
        &[
            "--snapshot-every",
            &dur("1s"),
            "--include-snapshots",
            "hourly_.*",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--include-snapshots/--exclude-snapshots leave out"));
}
