//! Monitoring on real pools: `zq-send run --every … --metrics-listen ADDR` answers
//! Prometheus scrapes with the datasets' lag and counters, the connection's statistics and
//! zfs command durations, and refuses what is not a scrape; `zq-recv serve
//! --metrics-listen` does the same for targets and sender connections; `zq-send status
//! --warn-lag/--crit-lag` judges a daemon's status file as a monitoring plugin does.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// The response to `request` sent to `addr`, or "" if it cannot connect.
fn http(addr: &str, request: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A loopback address with a port that was free a moment ago.
fn free_port() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// `zq-send status ARGS PATH`: its exit code and stdout.
fn zq_status(args: &[&str], path: &std::path::Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(SEND)
        .arg("status")
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    (out.status.code(), stdout(&out))
}

/// The value of the sample whose line starts with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_daemon_serves_prometheus_metrics() {
    let Some(_zfs) = zfs_or_skip("a_daemon_serves_prometheus_metrics") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("ms"), Pool::new("md"), Keys::new());
    let recv_addr = free_port();
    let recv = Recv::start_with_args(
        &keys,
        &[(&keys.send_fp, &dst.ds("b"))],
        &["--metrics-listen", &recv_addr],
    );
    let fs = src.create("fs");
    src.write("fs", "a", 100_000, 1);
    src.snap("fs", "s1");
    let target = dst.ds("b/fs");
    let addr = free_port();
    let daemon = Daemon::start(
        &keys,
        &recv,
        &fs,
        &target,
        &["--every", &dur("1s"), "--metrics-listen", &addr],
    );
    let labels = format!("{{source=\"{fs}\",target=\"{target}\"}}");
    let steps = format!("zq_steps_total{labels} ");
    let until = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let r = http(&addr, "GET /metrics HTTP/1.1\r\nHost: zq\r\n\r\n");
        if sample(&r, &steps).is_some_and(|n| n >= 1.0) || Instant::now() > until {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains("Content-Type: text/plain; version=0.0.4"),
        "{text}"
    );
    assert_eq!(sample(&text, &steps), Some(1.0), "{text}");
    assert!(sample(&text, &format!("zq_sent_bytes_total{labels} ")).unwrap() > 100_000.0);
    assert_eq!(
        sample(&text, &format!("zq_step_failures_total{labels} ")),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, &format!("zq_dataset_failing{labels} ")),
        Some(0.0)
    );
    assert!(sample(&text, &format!("zq_replication_lag_seconds{labels} ")).is_some());
    assert_eq!(sample(&text, "zq_connected "), Some(1.0), "{text}");
    let rtt = sample(&text, "zq_connection_rtt_seconds ").unwrap();
    assert!(rtt > 0.0 && rtt < 1.0, "{rtt}");
    assert!(sample(&text, "zq_connection_sent_packets_total ").unwrap() > 0.0);
    // The full stream's zfs send, timed.
    let sends = "zq_zfs_command_duration_seconds_count{command=\"send\"} ";
    assert!(sample(&text, sends).unwrap() >= 1.0, "{text}");
    assert!(text.contains("# TYPE zq_zfs_command_duration_seconds histogram"));

    // Anything but a scrape is refused, and the endpoint keeps serving.
    assert!(http(&addr, "GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(http(&addr, "hello\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(http(&addr, "GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200"));

    // The receiver's side of the same step and connection.
    let text = http(&recv_addr, "GET /metrics HTTP/1.1\r\n\r\n");
    let on_target = |name: &str| sample(&text, &format!("{name}{{target=\"{target}\"}} "));
    assert_eq!(on_target("zq_received_steps_total"), Some(1.0), "{text}");
    assert_eq!(on_target("zq_receive_failures_total"), Some(0.0));
    assert!(on_target("zq_received_bytes_total").unwrap() > 100_000.0);
    assert_eq!(
        sample(&text, "zq_receiver_connections "),
        Some(1.0),
        "{text}"
    );
    let rtt = format!(
        "zq_connection_rtt_seconds{{sender=\"{}\",remote=\"127.0.0.1:",
        &keys.send_fp[..8]
    );
    assert!(text.contains(&rtt), "{text}");
    let receives = "zq_zfs_command_duration_seconds_count{command=\"receive\"} ";
    assert!(sample(&text, receives).unwrap() >= 1.0, "{text}");

    // The same daemon through `zq-send status` with lag limits: exit code = level.
    let status = |limits: &[&str]| zq_status(limits, &daemon.status);
    let (code, said) = status(&["--warn-lag", "1h", "--crit-lag", "2h"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.starts_with("ZQ OK - 1 dataset(s) in 1 daemon(s)"),
        "{said}"
    );
    let (code, said) = status(&["--warn-lag", "1ms"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.starts_with(&format!("ZQ WARNING - {fs}: lag ")),
        "{said}"
    );
    let (code, said) = status(&["--warn-lag", "1ms", "--crit-lag", "2ms"]);
    assert_eq!(code, Some(2), "{said}");
    assert!(said.starts_with("ZQ CRITICAL - "), "{said}");
    // A stopped daemon's file says so (it said "connected" before), and a retired job's
    // file is removed by a command.
    let file = daemon.status.clone();
    assert_eq!(daemon.stop(Duration::from_secs(30)), Some(0));
    let (code, said) = zq_status(&[], &file);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("(STOPPED "), "{said}");
    let (code, said) = zq_status(&["--warn-lag", "1h"], &file);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("stopped"), "{said}");
    let (code, said) = zq_status(&["--remove-stopped"], file.parent().unwrap());
    assert_eq!(code, Some(0), "{said}");
    assert!(said.starts_with("removed "), "{said}");
    assert!(!file.exists());
    let (code, said) = zq_status(&["--crit-lag", "1h"], &keys.dir.path().join("none"));
    assert_eq!(code, Some(3));
    assert!(said.starts_with("ZQ UNKNOWN - no status files"), "{said}");
}

/// A one-shot run has nothing to scrape: a usage error rather than an endpoint that
/// vanishes at once.
#[test]
fn metrics_need_a_daemon() {
    let keys = Keys::new();
    let out = std::process::Command::new(SEND)
        .args([
            "run",
            "p/fs",
            "127.0.0.1:9",
            "q/fs",
            "--identity",
            keys.path(),
        ])
        .args(["--peer", &keys.recv_fp, "--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--metrics-listen needs a daemon"),
        "{}",
        stderr(&out)
    );
}

/// A long step shows in `zq-send status` while it runs: the snapshot, bytes so far, rate.
#[test]
fn status_shows_the_step_in_flight() {
    let Some(_zfs) = zfs_or_skip("status_shows_the_step_in_flight") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("is"), Pool::new("id"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let fs = src.create("fs");
    src.write("fs", "big", 16 << 20, 3);
    src.snap("fs", "s1");
    // 16 MiB at 4 MB/s: about 4 s in flight, stretched like the time it takes this test
    // to ask `zq-send status` (an emulated guest needs seconds per call).
    let bwlimit = ((4_000_000.0 / time_scale()) as u64).to_string();
    let daemon = Daemon::start(
        &keys,
        &recv,
        &fs,
        &dst.ds("fs"),
        &["--every", &dur("1s"), "--bwlimit", &bwlimit],
    );
    let table = || zq_status(&[], &daemon.status).1;
    // The status file is written at least once a second: both views while the step runs.
    let mut seen = None;
    let shown = wait_for(Duration::from_secs(30), || {
        if !daemon.status.exists() {
            return false;
        }
        let s = daemon.status()["datasets"][0]["sending"].clone();
        let t = table();
        if s["bytes"].as_u64().is_some_and(|b| b > 0) && t.contains("    sending @s1: ") {
            seen = Some((s, t));
        }
        seen.is_some()
    });
    assert!(
        shown,
        "no step in flight in the status:\n{}",
        daemon.log_text()
    );
    let (json, text) = seen.unwrap();
    assert_eq!(json["snapshot"], "s1", "{json}");
    // zfs-fuse cannot estimate a stream (no send -nvP): a full one gets the snapshot's
    // referenced size instead, which covers the 16 MiB file. Asked for once the step is
    // bulk, beside it.
    let estimated = wait_for(Duration::from_secs(10), || {
        daemon.status()["datasets"][0]["sending"]["estimate"]
            .as_u64()
            .is_some_and(|e| (16 << 20..20 << 20).contains(&e))
    });
    assert!(estimated, "{}", daemon.status());
    assert!(json["seconds"].as_f64().unwrap() >= 1.0, "{json}");
    assert!(text.contains("/s"), "{text}");
    let ended = wait_for(Duration::from_secs(30), || {
        daemon.status()["datasets"][0]["sending"].is_null()
    });
    assert!(ended, "the step never ended:\n{}", daemon.log_text());
}
