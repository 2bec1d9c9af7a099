//! `zq-bench` keeps working: the harness behind docs/benchmarks.md (no ZFS, no root).

use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_zq-bench");

#[test]
fn throughput_moves_the_bytes_through_zq_and_tcp_and_reports_both() {
    // Striped over 3 connections too: the sink merges them and counts one transfer.
    for (data, connections) in [("random", "1"), ("text", "1"), ("random", "3")] {
        let out = Command::new(BENCH)
            .args(["throughput", "--size", "8MiB", "--data", data])
            .args(["--connections", connections])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The sink checks every chunk and the stream's end, and reports what it received.
        for method in ["zq ", "tcp "] {
            let line = stdout
                .lines()
                .find(|l| l.starts_with(method))
                .unwrap_or_else(|| panic!("no {method}line in {stdout}"));
            assert!(
                line.contains("MB/s") && line.contains("(8388608 bytes in"),
                "{line}"
            );
        }
        assert!(stdout.contains("ratios: zq/tcp"), "{stdout}");
    }
}

#[test]
fn link_without_a_destination_is_a_usage_error() {
    let out = Command::new(BENCH)
        .args(["link", "--size", "1MiB"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--to"));
}

/// `--bwlimit` holds the data path to its rate (after a burst of at most a second).
#[test]
fn the_rate_limit_holds_the_data_path_back() {
    let out = Command::new(BENCH)
        .args(["throughput", "--size", "4MiB", "--bwlimit", "2MB"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("zq ")).unwrap();
    let secs: f64 = line
        .rsplit("bytes in ")
        .next()
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // 4.19 MB at 2 MB/s, less the burst (0.52 s: 1 MiB at that rate).
    assert!(secs >= 1.5, "{line}");
}
