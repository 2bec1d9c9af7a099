//! zq under systemd. zq-recv through `systemd-socket-activate --datagram` (what
//! `zq-recv.socket` does): it takes the socket from LISTEN_FDS, replicates through it, says
//! READY=1 and STOPPING=1 on NOTIFY_SOCKET, and exits 0 on SIGTERM. A zq-send daemon
//! (`zq-send@.service`) notifies the same way. The units pass `systemd-analyze verify`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;

/// The next sd_notify message (`READY=1`, …), or "" after 10 s.
fn notified(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).trim().to_string(),
        Err(_) => String::new(),
    }
}

#[test]
fn a_socket_activated_receiver_replicates_and_stops_cleanly() {
    let Some(_zfs) = zfs_or_skip("a_socket_activated_receiver_replicates") else {
        return;
    };
    let Some(_) = socket_activate_or_skip("a_socket_activated_receiver_replicates") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("as"), Pool::new("ad"), Keys::new());
    let notify_path = keys.dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut recv = Recv::socket_activated(
        &keys,
        &[(&keys.send_fp, &dst.ds("backup"))],
        &[],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let fs = src.create("fs");
    src.write("fs", "a", 200_000, 1);
    src.snap("fs", "s1");
    let target = dst.ds("backup/fs");
    // The first packet starts zq-recv; the handshake waits for it.
    let out = send(&keys, &recv, &fs, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(notified(&notify), "READY=1");

    // The same process and socket serve the next run.
    src.write("fs", "b", 50_000, 2);
    src.snap("fs", "s2");
    let out = send(&keys, &recv, &fs, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(snapshots(&target), snapshots(&fs));

    // systemctl stop: SIGTERM, a clean exit.
    recv.sigterm();
    let status = recv.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status:?}");
    assert_eq!(notified(&notify), "STOPPING=1");
    assert_eq!(read(&target, "b"), read(&fs, "b"));
}

/// Both a socket from systemd and --listen: a usage error naming both, not a guess.
#[test]
fn listen_conflicts_with_a_socket_from_systemd() {
    let Some(_) = socket_activate_or_skip("listen_conflicts_with_a_socket_from_systemd") else {
        return;
    };
    let keys = Keys::new();
    let mut recv = Recv::socket_activated(
        &keys,
        &[(&keys.send_fp, "pool/backup")],
        &["--listen", "127.0.0.1:0"],
        &[],
    );
    let poke = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    poke.send_to(b"start", &recv.addr).unwrap();
    let status = recv.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(2), "{status:?}");
    // The logging thread may still be copying the last line.
    std::thread::sleep(Duration::from_millis(200));
    let log = recv.log.lock().unwrap().clone();
    assert!(
        log.contains("--listen 127.0.0.1:0 given, but systemd passed 1 socket(s)"),
        "{log}"
    );
}

/// The units in systemd/ parse and pass systemd's own checks (with ExecStart pointing at
/// the binaries under test, as /usr/local/bin/zq-* do not exist here; the template as an
/// instance).
#[test]
fn units_pass_systemd_analyze_verify() {
    let Some(_) = socket_activate_or_skip("units_pass_systemd_analyze_verify") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let units = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");
    let mut paths = Vec::new();
    for (unit, as_name) in [
        ("zq-recv.socket", "zq-recv.socket"),
        ("zq-recv.service", "zq-recv.service"),
        ("zq-send@.service", "zq-send@tank-home.service"),
        ("zq-send-serve@.service", "zq-send-serve@tank-home.service"),
    ] {
        let text = std::fs::read_to_string(format!("{units}/{unit}")).unwrap();
        let path = dir.path().join(as_name);
        let text = text
            .replace("/usr/local/bin/zq-recv", RECV)
            .replace("/usr/local/bin/zq-send", SEND);
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .unwrap();
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// A sender daemon under a Type=notify unit: READY=1 at once (it reaches the receiver on
/// its own), STOPPING=1 on SIGTERM.
#[test]
fn a_sender_daemon_notifies_systemd() {
    let Some(_zfs) = zfs_or_skip("a_sender_daemon_notifies_systemd") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("ns"), Pool::new("nd"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let fs = src.create("fs");
    src.snap("fs", "s1");
    let notify_path = keys.dir.path().join("notify-send");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let daemon = Daemon::start_with_env(
        &keys,
        &recv.addr,
        &fs,
        &dst.ds("fs"),
        &["--every", "1s"],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    assert_eq!(notified(&notify), "READY=1", "{}", daemon.log_text());
    assert_eq!(daemon.stop(Duration::from_secs(30)), Some(0));
    assert_eq!(notified(&notify), "STOPPING=1");
}
