//! Retention by time grid and per side, on real pools, through `zq-send prune` (the same
//! pass a daemon runs): a dry run destroys nothing and says what would go; a real pass
//! keeps the base, held and foreign snapshots, and each side follows its own policy.

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

/// zq's name for a snapshot taken at `t`.
fn zq_name(t: SystemTime) -> String {
    format!("zq_{}", humantime::format_rfc3339_millis(t))
}

/// `t` rounded down to a multiple of `unit` since the epoch (grid periods are aligned so).
fn floor(t: SystemTime, unit: Duration) -> SystemTime {
    let since = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    UNIX_EPOCH + Duration::from_secs(since / unit.as_secs() * unit.as_secs())
}

fn names(dataset: &str) -> Vec<String> {
    snapshots(dataset).into_iter().map(|(n, _)| n).collect()
}

#[test]
fn a_time_grid_prunes_each_side_by_its_own_policy_and_a_dry_run_only_tells() {
    let Some(_zfs) =
        zfs_or_skip("a_time_grid_prunes_each_side_by_its_own_policy_and_a_dry_run_only_tells")
    else {
        return;
    };
    let (src, dst, keys) = (Pool::new("rs"), Pool::new("rd"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    src.create("d");
    let (source, target) = (src.ds("d"), dst.ds("d"));
    let now = SystemTime::now();
    let (hour, day) = (Duration::from_secs(3600), Duration::from_secs(86_400));
    // Grid 1h=all,24h=hourly,7d=daily: two snapshots in one UTC day 3-4 days ago (the
    // daily zone: the older stays), two in one hour 4-5 hours ago (hourly: the older
    // stays), one 10 days ago (past the grid: goes), a foreign one, two in the last hour.
    let three_days = floor(now - 3 * day - 12 * hour, day);
    let five_hours = floor(now - 5 * hour, hour);
    let old = zq_name(now - 10 * day);
    let daily_a = zq_name(three_days + hour);
    let daily_b = zq_name(three_days + 2 * hour);
    let hourly_a = zq_name(five_hours + Duration::from_secs(600));
    let hourly_b = zq_name(five_hours + Duration::from_secs(1200));
    let recent_a = zq_name(now - Duration::from_secs(1200));
    let recent_b = zq_name(now - Duration::from_secs(600));
    let all = [
        old.as_str(),
        &daily_a,
        &daily_b,
        &hourly_a,
        &hourly_b,
        "manual",
        &recent_a,
        &recent_b,
    ];
    for (i, name) in all.iter().enumerate() {
        src.write("d", "f", 1000 + i, i as u64);
        src.snap("d", name);
    }
    let out = send(&keys, &recv, &source, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(names(&target), all);
    // An operator's hold on one the grid would drop: it stays on the source.
    zfs(&["hold", "keep", &format!("{source}@{daily_b}")]);

    let prune_output = |extra: &[&str]| {
        Command::new(SEND)
            .args([
                "prune",
                &source,
                &recv.addr,
                &target,
                "--identity",
                keys.path(),
            ])
            .args(["--peer", &keys.recv_fp])
            .args(["--keep-grid", "1h=all,24h=hourly,7d=daily"])
            .args(extra)
            .output()
            .unwrap()
    };
    let prune = |extra: &[&str]| {
        let out = prune_output(extra);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    // The dry run says what would go, on both sides, and destroys nothing; the held one
    // would stay on the source, so it is not listed there.
    let said = prune(&["--dry-run"]);
    for name in [&old, &daily_b, &hourly_b] {
        assert!(
            said.contains(&format!("would destroy {target}@{name} (on the receiver)")),
            "{said}"
        );
    }
    for name in [&old, &hourly_b] {
        assert!(
            said.contains(&format!("would destroy {source}@{name}\n")),
            "{said}"
        );
    }
    let lines = said.lines().filter(|l| l.starts_with("would destroy"));
    assert_eq!(lines.count(), 5, "{said}");
    assert!(
        said.contains(&format!(
            "{source} -> {target}: would destroy 2 here, 3 on the receiver"
        )),
        "{said}"
    );
    assert_eq!(names(&source), all);
    assert_eq!(names(&target), all);

    // For real, with the target keeping the last 6 of zq's snapshots instead.
    let said = prune(&["--target-keep-last", "6"]);
    assert!(
        said.contains("retention: source keep grid 1h=all,1d=1h,7d=1d; target keep the last 6"),
        "{said}"
    );
    let without = |from: &[&str]| -> Vec<String> {
        all.iter()
            .filter(|n| !from.contains(n))
            .map(|n| n.to_string())
            .collect()
    };
    // The held one stays on the source; the base (the newest) and "manual" stay everywhere.
    assert_eq!(names(&source), without(&[&old, &hourly_b]), "{said}");
    assert_eq!(names(&target), without(&[&old]), "{said}");
    // The chain is intact: the next incremental goes on from the base.
    src.write("d", "f", 4242, 99);
    src.snap("d", "after");
    let out = send(&keys, &recv, &source, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(names(&target).last().map(String::as_str), Some("after"));

    // A receiver before protocol version 4 cannot apply a grid: said, exit 1, and the
    // target is left as it is.
    let before = names(&target);
    let out = prune_output(&["--protocol-version", "3"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("retention by time grid and dry runs need version 4"),
        "{}",
        stderr(&out)
    );
    assert_eq!(names(&target), before);
    zfs(&["release", "keep", &format!("{source}@{daily_b}")]);
}
