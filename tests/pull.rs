//! Pull mode on real pools: `zq-recv pull` dials `zq-send serve` (a backup server behind
//! NAT or a firewall), the data still flow source → destination under the receiver's
//! `--allow` roots, and the receiver redials when the connection ends.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// A child process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `zq-send serve SOURCE 127.0.0.1:0 TARGET …` and the address it listens on.
fn serve(keys: &Keys, source: &str, target: &str, extra: &[&str]) -> (Killed, String) {
    let mut cmd = Command::new(SEND);
    cmd.args([
        "serve",
        source,
        "127.0.0.1:0",
        target,
        "--identity",
        keys.path(),
    ])
    .args(["--peer", &keys.recv_fp])
    .args(extra);
    let (child, addr) = spawn_listening(cmd);
    (Killed(child), addr)
}

/// `zq-recv pull ADDR` allowing the sender inside `root`.
fn pull(keys: &Keys, addr: &str, root: &str) -> Killed {
    let spool = format!("{}/spool", keys.path());
    Killed(
        Command::new(RECV)
            .args([
                "pull",
                addr,
                "--peer",
                &keys.send_fp,
                "--identity",
                keys.path(),
            ])
            .args(["--allow", &format!("{}={root}", keys.send_fp)])
            .args(["--spool-dir", &spool])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + scaled(within);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_pulling_receiver_gets_a_serving_daemons_snapshots_and_redials() {
    let Some(_zfs) = zfs_or_skip("a_pulling_receiver_gets_a_serving_daemons_snapshots_and_redials")
    else {
        return;
    };
    let (src, dst, keys) = (Pool::new("ls"), Pool::new("ld"), Keys::new());
    src.create("d");
    let (source, target) = (src.ds("d"), dst.ds("d"));
    let status = keys.dir.path().join("status.json");
    let status = status.to_str().unwrap();
    let (mut sender, addr) = serve(
        &keys,
        &source,
        &target,
        &["--snapshot-every", &dur("1s"), "--status-file", status],
    );
    // Nobody has dialed in yet: the daemon runs and says it is not connected.
    std::thread::sleep(scaled(Duration::from_secs(3)));
    assert!(snapshots(&source).len() >= 2);
    assert!(!datasets(&dst.name).contains(&target));
    let receiver = pull(&keys, &addr, &dst.name);
    assert!(
        wait_for(Duration::from_secs(60), || snapshots(&target).len() >= 3),
        "nothing pulled"
    );
    // The daemon snapshots every second: the snapshot just made may still be on its way.
    assert!(
        wait_for(Duration::from_secs(10), || lag(&source, &target) == 0),
        "the backlog was not sent"
    );
    // The receiver goes away and comes back: it dials again and catches up.
    drop(receiver);
    std::thread::sleep(scaled(Duration::from_secs(2)));
    let before = snapshots(&target).len();
    let _receiver = pull(&keys, &addr, &dst.name);
    assert!(
        wait_for(Duration::from_secs(60), || snapshots(&target).len()
            >= before + 3),
        "no snapshot after the receiver came back"
    );
    Command::new("kill")
        .args(["-TERM", &sender.0.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(wait_exit(&mut sender.0, Duration::from_secs(30)), Some(0));
}

#[test]
fn a_one_shot_serve_obeys_the_pulling_receivers_roots() {
    let Some(_zfs) = zfs_or_skip("a_one_shot_serve_obeys_the_pulling_receivers_roots") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("os"), Pool::new("od"), Keys::new());
    src.create("d");
    src.snap("d", "s1");
    src.snap("d", "s2");
    let allowed = dst.create("allowed");
    // Outside the root the receiver allows this sender: refused, nothing written.
    let outside = dst.ds("elsewhere/d");
    let (mut sender, addr) = serve(&keys, &src.ds("d"), &outside, &[]);
    let _receiver = pull(&keys, &addr, &allowed);
    assert_eq!(wait_exit(&mut sender.0, Duration::from_secs(60)), Some(5));
    assert!(!datasets(&dst.name).contains(&outside));
    drop(_receiver);
    // Inside: replicated once, exit 0.
    let inside = format!("{allowed}/d");
    let (mut sender, addr) = serve(&keys, &src.ds("d"), &inside, &[]);
    let _receiver = pull(&keys, &addr, &allowed);
    assert_eq!(wait_exit(&mut sender.0, Duration::from_secs(60)), Some(0));
    assert_eq!(snapshots(&inside), snapshots(&src.ds("d")));
}

/// `zq-recv pull --config`: the receiver entry of the file gives the identity, spool and
/// roots; the port its host's address implies is not listened on when pulling.
#[test]
fn a_pulling_receiver_takes_its_roots_from_the_config_file() {
    let Some(_zfs) = zfs_or_skip("a_pulling_receiver_takes_its_roots_from_the_config_file") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("cs"), Pool::new("cd"), Keys::new());
    src.create("d");
    src.snap("d", "s1");
    let file = keys.dir.path().join("zq.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[hosts.vault]
address = "vault.example:7446"
[hosts.src]
fingerprint = "{send}"

[[receivers]]
host = "vault"
identity = "{keys}"
spool_dir = "{keys}/spool"
allow = [{{ sender = "src", root = "{root}" }}]
"#,
            send = keys.send_fp,
            keys = keys.path(),
            root = dst.name,
        ),
    )
    .unwrap();
    let target = dst.ds("d");
    let (mut sender, addr) = serve(&keys, &src.ds("d"), &target, &[]);
    let _receiver = Killed(
        Command::new(RECV)
            .args(["pull", &addr, "--peer", &keys.send_fp, "--config"])
            .arg(&file)
            .args(["--host", "vault"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    assert_eq!(wait_exit(&mut sender.0, Duration::from_secs(60)), Some(0));
    assert_eq!(snapshots(&target), snapshots(&src.ds("d")));
}
