//! The config file (`--config`): the examples in docs/examples/ are valid, `check-config`
//! names what is wrong, a fleet file drives a receiver and a daemon on real pools, and
//! flags and environment variables override the file (defaults < file < env < flags).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn check_config(file: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(SEND)
        .args(["check-config", "--config"])
        .arg(file)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn every_example_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples");
    let mut examples: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 2, "{examples:?}");
    for example in examples {
        let out = check_config(&example, &["--all"]);
        assert!(
            out.status.success(),
            "{}: {}",
            example.display(),
            stderr(&out)
        );
        assert!(stdout(&out).contains(": valid ("), "{}", stdout(&out));
        // Every job of every host came out as a command line.
        assert!(
            stdout(&out).contains("    zq-send run "),
            "{}",
            stdout(&out)
        );
    }
}

#[test]
fn check_config_shows_one_host_and_names_what_is_wrong() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/fleet.toml");
    let out = check_config(&example, &["--host", "db2.example.net"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = stdout(&out);
    assert!(
        shown.contains("host db2.example.net:\n  job pg: tank/pg"),
        "{shown}"
    );
    assert!(shown.contains("backup/db2/pg"), "{shown}");
    assert!(!shown.contains("job sanoid"), "{shown}");

    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&example).unwrap();
    for (from, to, said) in [
        (
            "snapshot_every = \"1s\"",
            "snapshot_every = \"1x\"",
            "job \"pg\" on host \"db1\": `snapshot_every`: invalid value '1x' for '--snapshot-every",
        ),
        (
            "recursive = true",
            "recursve = true",
            "unknown key `recursve` (did you mean `recursive`?)",
        ),
        (
            "name = \"sanoid\"",
            "name = \"pg\"",
            "both named \"pg\" on host \"db1\"",
        ),
        (
            "name = \"sanoid\"",
            "name = \"sa noid\"",
            "job \"sa noid\" on host \"db1\": --job \"sa noid\"",
        ),
        (
            "skip_parent = true",
            "skip_parent = \"yes\"",
            "`filter.skip_parent`: expected true or false, not string",
        ),
        (
            "{ sender = \"db3\", root = \"backup/db3\" }",
            "{ sender = \"db4\", root = \"backup/db3\" }",
            "receiver on host \"backup-a\": `allow`: invalid value 'db4=backup/db3' for '--allow",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text.replacen(from, to, 1)).unwrap();
        let out = check_config(&bad, &["--all"]);
        assert_eq!(out.status.code(), Some(2), "{to}: {}", stdout(&out));
        assert!(stderr(&out).contains(said), "{to}: {}", stderr(&out));
    }
}

/// The fleet file of one test: a receiver on host "vault" and the jobs of host "src".
fn fleet(keys: &Keys, recv_addr: Option<&str>, src: &Pool, dst: &Pool, jobs: &str) -> String {
    let address = recv_addr
        .map(|a| format!("address = \"{a}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
[hosts.vault]
{address}fingerprint = "{recv}"
[hosts.src]
fingerprint = "{send}"

[defaults]
identity = "{keys}"
receiver = "vault"
jitter = "0s"

{jobs}

[[receivers]]
host = "vault"
listen = "127.0.0.1:0"
identity = "{keys}"
spool_dir = "{keys}/spool"
allow = [{{ sender = "{{host}}" , root = "{dst}" }}]
"#,
        recv = keys.recv_fp,
        send = keys.send_fp,
        keys = keys.path(),
        dst = dst.name,
        jobs = jobs.replace("SRC", &src.name).replace("DST", &dst.name),
    )
}

/// The receiver of `file` for host "vault", named by ZQ_HOST as a unit's environment
/// would. Regression: on 4f8ee5d ZQ_HOST made every receiver entry fail ("the following
/// required arguments were not provided:"), since parsing the entry read it again.
fn config_recv(file: &Path) -> Recv {
    let mut cmd = Command::new(RECV);
    cmd.args(["serve", "--config"])
        .arg(file)
        .env("ZQ_HOST", "vault");
    Recv::spawn_command(cmd)
}

#[test]
fn a_fleet_file_drives_the_receiver_and_a_filtered_daemon() {
    let Some(_zfs) = zfs_or_skip("a_fleet_file_drives_the_receiver_and_a_filtered_daemon") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("cs"), Pool::new("cd"), Keys::new());
    for d in ["t", "t/a", "t/b", "t/tmp"] {
        src.create(d);
    }
    // The receiver allows the sender by its name in [hosts].
    let file = keys.dir.path().join("zq.toml");
    let status = keys.dir.path().join("{host}-t.json");
    let jobs = format!(
        r#"
[[jobs]]
name = "t"
host = "src"
source = "SRC/t"
target = "DST/t"
recursive = true
snapshot_every = "{}"
status_file = "{}"
[jobs.filter]
exclude = ["tmp"]
[jobs.retention]
keep_last = 3
"#,
        dur("1s"),
        status.display()
    );
    // The whole file is checked, jobs too: the receiver starts from one without them.
    let text = fleet(&keys, None, &src, &dst, "").replace("\"{host}\"", "\"src\"");
    std::fs::write(&file, &text).unwrap();
    let recv = config_recv(&file);
    // Now that the receiver listens, the file can say where, and add the job.
    std::fs::write(
        &file,
        fleet(&keys, Some(&recv.addr), &src, &dst, &jobs).replace("\"{host}\"", "\"src\""),
    )
    .unwrap();

    let mut cmd = Command::new(SEND);
    cmd.args(["run", "--config"])
        .arg(&file)
        .env("ZQ_HOST", "src");
    let daemon = Daemon::spawn_command(cmd, &keys, keys.dir.path().join("src-t.json"));
    let (a, b) = (dst.ds("t/a"), dst.ds("t/b"));
    let replicated = wait_for(Duration::from_secs(60), || {
        datasets(&dst.name).contains(&b) && snapshots(&a).len() >= 3 && snapshots(&b).len() >= 3
    });
    assert!(replicated, "{}", daemon.log_text());
    assert!(!datasets(&dst.name).contains(&dst.ds("t/tmp")));
    assert!(
        snapshots(&src.ds("t/tmp")).is_empty(),
        "an excluded dataset got zq's snapshots"
    );
    // The file's retention: once the daemon has made 8 snapshots, at most 3 of them stay
    // (plus one in flight).
    let mut made = std::collections::BTreeSet::new();
    let pruned = wait_for(Duration::from_secs(60), || {
        let now = snapshots(&src.ds("t/a"));
        made.extend(now.iter().map(|(name, _)| name.clone()));
        made.len() >= 8 && now.len() <= 4
    });
    assert!(
        pruned,
        "{:?}\n{}",
        snapshots(&src.ds("t/a")),
        daemon.log_text()
    );
    // The status file the file named, with {host} replaced.
    let status = daemon.status();
    assert!(status.to_string().contains("/t/a"), "{status}");
    assert_eq!(daemon.stop(Duration::from_secs(30)), Some(0));
    drop(recv);
}

#[test]
fn flags_beat_the_environment_which_beats_the_file() {
    let Some(_zfs) = zfs_or_skip("flags_beat_the_environment_which_beats_the_file") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("ps"), Pool::new("pd"), Keys::new());
    for d in ["x", "y"] {
        src.create(d);
        src.snap(d, "s1");
    }
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    // Two one-shot jobs of host "src"; the file's zfs program does not exist.
    let jobs = r#"
[[jobs]]
name = "x"
host = "src"
source = "SRC/x"
target = "DST/x"
zfs = "/nonexistent/zfs"

[[jobs]]
name = "y"
host = "src"
source = "SRC/y"
target = "DST/y"
zfs = "/nonexistent/zfs"
"#;
    let file = keys.dir.path().join("zq.toml");
    std::fs::write(
        &file,
        fleet(&keys, Some(&recv.addr), &src, &dst, jobs).replace("{host}", &keys.send_fp),
    )
    .unwrap();
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        Command::new(SEND)
            .args(["run", "--config"])
            .arg(&file)
            .args(["--host", "src"])
            .args(extra)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    // The file alone: its zfs is used, and fails.
    let out = run(&["--job", "x"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/zfs"),
        "{}",
        stderr(&out)
    );
    // The environment beats the file; --job runs only that job.
    let out = run(&["--job", "x"], &[("ZQ_ZFS", "zfs")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(snapshots(&dst.ds("x")), snapshots(&src.ds("x")));
    assert!(!datasets(&dst.name).contains(&dst.ds("y")));
    // A flag beats the environment; without --job, every job of the host runs.
    let out = run(&["--zfs", "zfs"], &[("ZQ_ZFS", "/nonexistent/zfs")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("x: up to date"), "{}", stdout(&out));
    assert_eq!(snapshots(&dst.ds("y")), snapshots(&src.ds("y")));
    // A per-job setting given once for several jobs is refused.
    let out = run(&["--status-file", "/tmp/x.json"], &[("ZQ_ZFS", "zfs")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("set it per job"), "{}", stderr(&out));
}
