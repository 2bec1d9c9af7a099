//! OpenZFS-native replication end to end (issue 18): raw sends of encrypted datasets,
//! compressed sends, and the receiver's rules about encryption. Each test asks the
//! platform whether it has what the test needs (native encryption, zstd compression) and
//! says "not applicable" where it does not (zfs-fuse, pool version 23); the OpenZFS tier
//! runs them all.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Whether this platform's pools can have feature `name` (`zpool upgrade -v`, which needs
/// no pool; zfs-fuse lists pool versions, no features). Asked before a test makes pools,
/// so that where it cannot apply it costs nothing: on zfs-fuse the ZFS tests take turns,
/// and a test's pools would keep the others waiting. Says so when not.
fn supports(name: &str) -> bool {
    let out = Command::new("zpool").args(["upgrade", "-v"]).output();
    let listed = out.is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .any(|w| w == name)
    });
    if !listed {
        eprintln!("not applicable here: this ZFS has no pool feature {name}");
    }
    listed
}

/// A hex key file in the test's key folder.
fn key_file(keys: &Keys) -> PathBuf {
    let key = keys.dir.path().join("secret.key");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    key
}

/// Creates `pool/rel` encrypted with `key` (or, with `key` None, with `encryption=off`
/// under an encrypted parent); `None` where this ZFS cannot (no native encryption), after
/// saying so.
fn create_encrypted(pool: &Pool, rel: &str, key: Option<&Path>) -> Option<String> {
    let ds = pool.ds(rel);
    let mut cmd = Command::new("zfs");
    cmd.arg("create");
    match key {
        Some(key) => cmd
            .args(["-o", "encryption=on", "-o", "keyformat=hex"])
            .arg(format!("-okeylocation=file://{}", key.display())),
        None => cmd.args(["-o", "encryption=off"]),
    };
    let out = cmd.arg(&ds).output().unwrap();
    if !out.status.success() {
        eprintln!(
            "not applicable here: this ZFS cannot create {ds} ({})",
            stderr(&out).trim()
        );
        return None;
    }
    Some(ds)
}

fn get(dataset: &str, property: &str) -> String {
    zfs(&["get", "-H", "-o", "value", property, dataset])
        .trim()
        .to_string()
}

/// Asserts that a run whose log is `err` sent its step from the bookmark `mark` (logged so)
/// and no full stream.
fn sent_from_bookmark(err: &str, mark: &str) {
    assert!(err.contains("sending from its bookmark"), "{err}");
    assert!(err.contains(mark), "{err}");
    let sent = logged(err, "bytes");
    assert!(sent < 1 << 20, "{sent} bytes: a full stream?\n{err}");
}

/// The first `name=NUMBER` field of zq's log lines in `err`.
fn logged(err: &str, name: &str) -> u64 {
    let at = err
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("{name} in {err}"));
    err[at + name.len() + 2..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// An encrypted dataset (and its child, which inherits the key) under an unencrypted
/// parent goes raw, full then incremental: the destination never has the key, and
/// `zfs load-key` there opens replicas identical to the source.
#[test]
fn encrypted_datasets_go_raw_and_open_with_their_key_on_the_destination() {
    let Some(_zfs) = zfs_or_skip("encrypted_raw") else {
        return;
    };
    if !supports("encryption") {
        return;
    }
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let key = key_file(&keys);
    let tree = src.create("tree");
    let Some(secret) = create_encrypted(&src, "tree/secret", Some(&key)) else {
        return;
    };
    src.create("tree/secret/inner");
    src.write("tree", "open", 50_000, 1);
    src.write("tree/secret", "f", 300_000, 2);
    src.write("tree/secret/inner", "g", 100_000, 3);
    zfs(&["snapshot", "-r", &format!("{tree}@s1")]);
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    // Into a root whose parents do not exist: zq creates them (unencrypted placeholders),
    // and the raw child must still be its own encryption root there.
    let target = dst.ds("backup/hosts/tree");

    let out = send(&keys, &recv, &tree, &target, &["--recursive"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("send=-w"), "{}", stderr(&out));
    src.write("tree/secret", "f2", 200_000, 4);
    src.write("tree/secret/inner", "g2", 50_000, 5);
    zfs(&["snapshot", "-r", &format!("{tree}@s2")]);
    let out = send(&keys, &recv, &tree, &target, &["--recursive"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let (t_secret, t_inner) = (format!("{target}/secret"), format!("{target}/secret/inner"));
    assert_eq!(snapshots(&t_secret), snapshots(&secret));
    for ds in [&t_secret, &t_inner] {
        assert_ne!(get(ds, "encryption"), "off", "{ds}");
        assert_eq!(
            get(ds, "keystatus"),
            "unavailable",
            "{ds}: the key never came"
        );
    }
    assert_eq!(get(&target, "encryption"), "off");
    assert_eq!(get(&dst.ds("backup"), "encryption"), "off");
    // The replica opens with the source's key, at each encryption root it has there (the
    // child, sent on its own, may have become one).
    let mut roots: Vec<String> = [&t_secret, &t_inner]
        .iter()
        .map(|ds| get(ds, "encryptionroot"))
        .collect();
    eprintln!("encryption roots on the destination: {roots:?}");
    roots.dedup();
    for root in &roots {
        let load = Command::new("zfs")
            .args(["load-key", "-L"])
            .arg(format!("file://{}", key.display()))
            .arg(root)
            .output()
            .unwrap();
        assert!(load.status.success(), "load-key {root}: {}", stderr(&load));
    }
    for (ds, file) in [
        (&t_secret, "f"),
        (&t_secret, "f2"),
        (&t_inner, "g"),
        (&t_inner, "g2"),
    ] {
        let source = ds.replacen(&target, &tree, 1);
        assert_eq!(read(ds, file), read(&source, file), "{ds}/{file}");
    }
    assert_eq!(read(&target, "open"), read(&tree, "open"));
}

/// The reverse tree: an unencrypted child of an encrypted dataset. The parent goes raw
/// (its key stays away); the child goes plain and is received with `encryption=off`
/// rather than failing to inherit a key the destination does not have.
#[test]
fn an_unencrypted_child_of_an_encrypted_dataset_replicates_unencrypted() {
    let Some(_zfs) = zfs_or_skip("unencrypted_child") else {
        return;
    };
    if !supports("encryption") {
        return;
    }
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let key = key_file(&keys);
    let Some(vault) = create_encrypted(&src, "vault", Some(&key)) else {
        return;
    };
    let Some(open) = create_encrypted(&src, "vault/open", None) else {
        return;
    };
    src.write("vault/open", "f", 100_000, 7);
    zfs(&["snapshot", "-r", &format!("{vault}@s1")]);
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let target = dst.ds("vault");
    let out = send(&keys, &recv, &vault, &target, &["--recursive"]);
    assert!(out.status.success(), "{}", stderr(&out));
    src.write("vault/open", "f2", 100_000, 8);
    zfs(&["snapshot", "-r", &format!("{vault}@s2")]);
    let out = send(&keys, &recv, &vault, &target, &["--recursive"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let t_open = format!("{target}/open");
    assert_eq!(get(&target, "keystatus"), "unavailable");
    assert_eq!(get(&t_open, "encryption"), "off");
    assert_eq!(snapshots(&t_open), snapshots(&open));
    assert_eq!(read(&t_open, "f2"), read(&open, "f2"));
}

/// A plain dataset received under an encrypted one whose key the destination has is
/// encrypted there, with that key (the receiver decides); zq leaves out `-e`, which such
/// a receive refuses.
#[test]
fn a_plain_dataset_received_under_an_encrypted_one_is_encrypted_there() {
    let Some(_zfs) = zfs_or_skip("plain_under_encrypted") else {
        return;
    };
    if !supports("encryption") {
        return;
    }
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let key = key_file(&keys);
    let Some(vault) = create_encrypted(&dst, "vault", Some(&key)) else {
        return;
    };
    let fs = src.create("fs");
    src.write("fs", "f", 100_000, 9);
    src.snap("fs", "s1");
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let target = format!("{vault}/fs");
    let out = send(&keys, &recv, &fs, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("send=-c -L") && !err.contains("-L -e"),
        "{err}"
    );
    assert_eq!(get(&target, "encryptionroot"), vault);
    assert_eq!(read(&target, "f"), read(&fs, "f"));
}

/// Where raw is impossible (the destination pool lacks the encryption feature), an
/// encrypted dataset is refused by name, not sent as plaintext, and not retried; its
/// siblings replicate. With `--encrypted decrypt` the job says plaintext is fine.
#[test]
fn an_encrypted_dataset_goes_as_plaintext_only_when_the_job_says_so() {
    let Some(_zfs) = zfs_or_skip("encrypted_opt_in") else {
        return;
    };
    if !supports("encryption") {
        return;
    }
    let (src, keys) = (Pool::new("s"), Keys::new());
    let key = key_file(&keys);
    let tree = src.create("tree");
    src.create("tree/plain");
    let Some(secret) = create_encrypted(&src, "tree/secret", Some(&key)) else {
        return;
    };
    let dst = Pool::with_options("d", &["-o", "feature@encryption=disabled"]);
    src.write("tree/secret", "f", 10_000, 3);
    zfs(&["snapshot", "-r", &format!("{tree}@s1")]);
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let target = dst.ds("tree");

    let out = send(&keys, &recv, &tree, &target, &["--recursive"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("lacks the feature encryption") && err.contains("--encrypted decrypt"),
        "{err}"
    );
    assert!(
        !err.contains("running the job again"),
        "a refusal is not retried: {err}"
    );
    assert!(datasets(&dst.name).iter().all(|d| !d.ends_with("/secret")));
    assert_eq!(
        snapshots(&dst.ds("tree/plain")),
        snapshots(&src.ds("tree/plain"))
    );

    let out = send(
        &keys,
        &recv,
        &tree,
        &target,
        &["--recursive", "--encrypted", "decrypt"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let t_secret = dst.ds("tree/secret");
    assert_eq!(get(&t_secret, "encryption"), "off");
    assert_eq!(read(&t_secret, "f"), read(&secret, "f"));
}

/// `zq-recv --require-encrypted`: raw streams of encrypted datasets only. A sender that
/// knows (protocol 6) does not send the rest; one that does not (protocol 5) is refused
/// by the receiver before `zfs receive` sees a byte.
#[test]
fn a_receiver_that_requires_encryption_takes_only_raw_streams() {
    let Some(_zfs) = zfs_or_skip("require_encrypted") else {
        return;
    };
    if !supports("encryption") {
        return;
    }
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let key = key_file(&keys);
    let Some(secret) = create_encrypted(&src, "secret", Some(&key)) else {
        return;
    };
    src.create("secret/child");
    let plain = src.create("plain");
    zfs(&["snapshot", "-r", &format!("{}@s1", src.name)]);
    let recv = Recv::start_with_args(
        &keys,
        &[(&keys.send_fp, &dst.name)],
        &["--require-encrypted"],
    );

    let out = send(&keys, &recv, &secret, &dst.ds("secret"), &["-r"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(get(&dst.ds("secret/child"), "keystatus"), "unavailable");

    let out = send(&keys, &recv, &plain, &dst.ds("plain"), &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("takes only raw sends") && err.contains("it is not encrypted"),
        "{err}"
    );
    let out = send(
        &keys,
        &recv,
        &plain,
        &dst.ds("plain"),
        &["--protocol-version", "5"],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--require-encrypted") && err.contains("Nothing was received"),
        "{err}"
    );
    assert!(datasets(&dst.name).iter().all(|d| !d.ends_with("/plain")));
}

/// A `compression=zstd` dataset of text: with `zfs send -c` (the default) the stream is
/// about its on-disk size, without it about its logical size; both arrive identical. zq's
/// `--compress auto` never makes the compressed stream larger. Prints the figures for
/// docs/benchmarks.md.
#[test]
fn compressed_sends_put_the_on_disk_bytes_on_the_wire() {
    let Some(_zfs) = zfs_or_skip("compressed_send") else {
        return;
    };
    if !supports("zstd_compress") {
        return;
    }
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let fs = src.ds("z");
    let created = Command::new("zfs")
        .args([
            "create",
            "-o",
            "compression=zstd",
            "-o",
            "recordsize=1M",
            &fs,
        ])
        .output()
        .unwrap();
    if !created.status.success() {
        eprintln!(
            "not applicable here: no zstd compression ({})",
            stderr(&created).trim()
        );
        return;
    }
    let text: String = (0..400_000)
        .map(|i| {
            format!(
                "{i:08} zq replicates zfs snapshots over quic, {}\n",
                i % 977
            )
        })
        .collect();
    std::fs::write(mount(&fs).join("log"), &text).unwrap();
    src.snap("z", "s1");
    let snap = format!("{fs}@s1");
    let logical: u64 = zfs(&["get", "-Hp", "-o", "value", "logicalreferenced", &snap])
        .trim()
        .parse()
        .unwrap();
    let on_disk: u64 = zfs(&["get", "-Hp", "-o", "value", "referenced", &snap])
        .trim()
        .parse()
        .unwrap();
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);

    let (a, b) = (dst.ds("a"), dst.ds("b"));
    let out = send(&keys, &recv, &fs, &a, &["--compress", "auto"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let (with_c, zq_wire) = (logged(&err, "bytes"), logged(&err, "wire_bytes"));
    let out = send(&keys, &recv, &fs, &b, &["--send-compressed", "off"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let without_c = logged(&stderr(&out), "bytes");
    eprintln!(
        "compression=zstd, {} bytes of text: logical {logical}, on disk {on_disk}; stream \
         with -c {with_c} (after zq --compress auto: {zq_wire}), without -c {without_c}",
        text.len()
    );
    assert!(with_c < logical / 3, "-c sent {with_c} of {logical}");
    assert!(
        with_c < on_disk + on_disk / 4,
        "-c sent {with_c}, on disk {on_disk}"
    );
    assert!(
        without_c > logical - logical / 10,
        "plain sent {without_c} of {logical}"
    );
    assert!(
        zq_wire <= with_c + with_c / 100,
        "zq grew it: {zq_wire} of {with_c}"
    );
    assert_eq!(read(&a, "log"), text.as_bytes());
    assert_eq!(read(&b, "log"), text.as_bytes());
}

fn resume_token(dataset: &str) -> Option<String> {
    let out = Command::new("zfs")
        .args(["get", "-H", "-o", "value", "receive_resume_token", dataset])
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && v != "-" && !v.is_empty()).then_some(v)
}

/// A full step of `mib` MiB of random data (`fs@s1` into `d/fs`), sent by a daemon at
/// 3 MB/s with `extra` options and killed once `at` bytes are in the destination pool:
/// zfs keeps a partial receive there (checked). What is left for the test to do.
struct Interrupted {
    src: Pool,
    /// Destroyed with the rest once the test ends.
    _dst: Pool,
    keys: Keys,
    recv: Recv,
    ds: String,
    target: String,
}

fn interrupted_full_step(mib: usize, seed: u64, extra: &[&str], at: u64) -> Interrupted {
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let ds = src.create("fs");
    src.write("fs", "big", mib << 20, seed);
    src.snap("fs", "s1");
    let target = dst.ds("fs");
    let every = dur("1s");
    let args = slow_daemon_args(&every, extra);
    let daemon = Daemon::start(&keys, &recv, &ds, &target, &args);
    interrupt(daemon, &keys, &dst, &ds, &target, at);
    Interrupted {
        src,
        _dst: dst,
        keys,
        recv,
        ds,
        target,
    }
}

/// The daemon's args for a step slow enough to be cut: 3 MB/s, a 3 s idle timeout.
fn slow_daemon_args<'a>(every: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let slow = ["--every", every, "--idle-timeout", "3s", "--bwlimit", "3MB"];
    [&slow[..], extra].concat()
}

/// Kills `daemon` (SIGKILL) once its step has `at` bytes in the destination pool `dst`,
/// and waits until zfs kept the partial receive of `target` (and no spool was written).
fn interrupt(mut daemon: Daemon, keys: &Keys, dst: &Pool, ds: &str, target: &str, at: u64) {
    daemon.await_transferred(keys, dst, at);
    daemon.kill9();
    // Shown only if the test fails: what the step had done when it was cut.
    eprintln!("the daemon killed at {} bytes:\n{}", at, daemon.log_text());
    // Its `zfs send` outlives it until its next write finds the pipe closed: until then
    // the step's snapshots are busy (a test that destroys one would fail).
    assert!(
        gone(&format!("^zfs send .*{ds}@"), 30),
        "the killed daemon's zfs send still runs"
    );
    assert_eq!(
        spooled(keys),
        0,
        "no spool where zfs keeps partial receives"
    );
    assert!(
        wait_for(Duration::from_secs(30), || resume_token(target).is_some()),
        "no partial receive was kept"
    );
    // zfs shows a token while the receive still runs: wait until the receiver has noticed
    // the dead connection and its `zfs receive` is gone, so that the next run lists the
    // partial receive rather than racing the old step for the target.
    assert!(
        gone(&format!("^zfs receive .*{target}$"), 60),
        "the killed daemon's step still receives into {target}"
    );
}

/// Whether, within `secs` seconds, no process's command line matches `pattern`.
fn gone(pattern: &str, secs: u64) -> bool {
    wait_for(Duration::from_secs(secs), || {
        !Command::new("pgrep")
            .args(["-f", pattern])
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A daemon killed in the middle of a large full step leaves zfs's partial receive on the
/// destination (no spool is written); a one-shot run then lists it, checks the token and
/// sends only the rest with `zfs send -t`.
#[test]
fn an_interrupted_step_resumes_from_zfs_partial_receive_without_a_spool() {
    let Some(_zfs) = zfs_or_skip("native_resume") else {
        return;
    };
    if !supports("extensible_dataset") {
        return;
    }
    let i = interrupted_full_step(48, 31, &[], 8 << 20);
    let out = send(&i.keys, &i.recv, &i.ds, &i.target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("resumed from zfs send -t"), "{err}");
    let not_sent = logged(&err, "resumed_bytes");
    assert!(
        not_sent >= 1 << 20,
        "only {not_sent} bytes were kept: {err}"
    );
    assert_eq!(snapshots(&i.target), snapshots(&i.ds));
    assert_eq!(resume_token(&i.target), None);
    assert_eq!(spooled(&i.keys), 0);
    assert_eq!(read(&i.target, "big"), read(&i.ds, "big"));
}

/// A partial receive whose snapshot was destroyed on the source since: the token cannot be
/// used, so it is discarded (`zfs receive -A`) without anyone's help, with a log line
/// saying why, and the dataset is replicated afresh.
#[test]
fn a_partial_receive_that_is_no_longer_the_way_forward_is_discarded() {
    let Some(_zfs) = zfs_or_skip("stale_token") else {
        return;
    };
    if !supports("extensible_dataset") {
        return;
    }
    // No holds: nothing keeps s1 from being destroyed.
    let nothing = ["--protection", "guarantee_nothing"];
    let i = interrupted_full_step(32, 37, &nothing, 4 << 20);
    zfs(&["destroy", &format!("{}@s1", i.ds)]);
    i.src.write("fs", "more", 100_000, 38);
    i.src.snap("fs", "s2");

    let out = send(&i.keys, &i.recv, &i.ds, &i.target, &nothing);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("no longer the way forward") && err.contains("gone from the source"),
        "{err}"
    );
    assert!(!err.contains("resumed_bytes="), "{err}");
    assert_eq!(snapshots(&i.target), snapshots(&i.ds));
    assert_eq!(resume_token(&i.target), None);
    assert_eq!(read(&i.target, "more"), read(&i.ds, "more"));
}

/// The block device of volume `vol`: `/dev/zvol/VOL` where udev made it, else the `zd`
/// device `zvol_id` names so (the test guest has no udev). Waits up to 10 s for it.
fn zvol_device(vol: &str) -> Option<PathBuf> {
    let find = || {
        let link = PathBuf::from(format!("/dev/zvol/{vol}"));
        if link.exists() {
            return Some(link);
        }
        let zvol_id = ["/lib/udev/zvol_id", "/usr/lib/udev/zvol_id"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        std::fs::read_dir("/dev")
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("zd") && !n.contains('p'))
            })
            .find(|p| {
                Command::new(zvol_id)
                    .arg(p)
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == vol)
            })
    };
    let mut found = None;
    wait_for(Duration::from_secs(10), || {
        found = find();
        found.is_some()
    });
    found
}

/// Writes `bytes` of pseudo-random data at the start of volume `vol`.
fn write_volume(vol: &str, bytes: usize, seed: u64) -> Vec<u8> {
    let dev = zvol_device(vol).unwrap_or_else(|| panic!("no device for {vol}"));
    let mut x = seed | 1;
    let data: Vec<u8> = (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    std::io::Write::write_all(&mut f, &data).unwrap();
    f.sync_all().unwrap();
    data
}

fn read_volume(vol: &str, bytes: usize) -> Vec<u8> {
    let dev = zvol_device(vol).unwrap_or_else(|| panic!("no device for {vol}"));
    let mut f = std::fs::File::open(dev).unwrap();
    let mut data = vec![0; bytes];
    std::io::Read::read_exact(&mut f, &mut data).unwrap();
    data
}

/// Volumes replicate like filesystems: full, then incremental, and an encrypted one raw
/// (its key stays away; `zfs load-key` opens it there).
#[test]
fn volumes_replicate_and_an_encrypted_one_goes_raw() {
    let Some(_zfs) = zfs_or_skip("volumes") else {
        return;
    };
    if !supports("encryption") {
        return;
    }
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let key = key_file(&keys);
    let vols = src.create("vols");
    let vol = src.ds("vols/v");
    let made = Command::new("zfs")
        .args(["create", "-V", "16M", &vol])
        .output()
        .unwrap();
    if !made.status.success() || zvol_device(&vol).is_none() {
        eprintln!(
            "not applicable here: no volumes with a block device ({})",
            stderr(&made).trim()
        );
        return;
    }
    let evol = src.ds("vols/ev");
    let made = Command::new("zfs")
        .args([
            "create",
            "-V",
            "16M",
            "-o",
            "encryption=on",
            "-o",
            "keyformat=hex",
        ])
        .arg(format!("-okeylocation=file://{}", key.display()))
        .arg(&evol)
        .output()
        .unwrap();
    if !made.status.success() {
        eprintln!(
            "not applicable here: no encrypted volumes ({})",
            stderr(&made).trim()
        );
        return;
    }
    let first = write_volume(&vol, 1 << 20, 41);
    write_volume(&evol, 1 << 20, 42);
    zfs(&["snapshot", "-r", &format!("{vols}@s1")]);
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let target = dst.ds("vols");
    let out = send(&keys, &recv, &vols, &target, &["--recursive"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = write_volume(&vol, 2 << 20, 43);
    let esecond = write_volume(&evol, 2 << 20, 44);
    zfs(&["snapshot", "-r", &format!("{vols}@s2")]);
    let out = send(&keys, &recv, &vols, &target, &["--recursive"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("send=-w"), "{}", stderr(&out));

    let (t_vol, t_evol) = (dst.ds("vols/v"), dst.ds("vols/ev"));
    assert_eq!(snapshots(&t_vol), snapshots(&vol));
    assert_eq!(snapshots(&t_evol), snapshots(&evol));
    assert_eq!(get(&t_vol, "type"), "volume");
    assert_eq!(get(&t_evol, "keystatus"), "unavailable");
    assert_ne!(first, second);
    assert_eq!(read_volume(&t_vol, 2 << 20), second);
    let load = Command::new("zfs")
        .args(["load-key", "-L"])
        .arg(format!("file://{}", key.display()))
        .arg(&t_evol)
        .output()
        .unwrap();
    assert!(load.status.success(), "load-key: {}", stderr(&load));
    assert_eq!(read_volume(&t_evol, 2 << 20), esecond);
}

/// A snapshot destroyed on the source after it was replicated, a bookmark of it left (by
/// an operator, or a tool like syncoid --create-bookmark): the next run is incremental
/// from the bookmark (`zfs send -i #bookmark`), neither a full stream nor divergence.
#[test]
fn a_bookmark_keeps_replication_incremental_after_its_snapshot_is_destroyed() {
    let Some(_zfs) = zfs_or_skip("bookmark_base") else {
        return;
    };
    if !supports("bookmarks") {
        return;
    }
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let ds = src.create("fs");
    let target = dst.ds("fs");
    // No holds: nothing keeps s1 from being destroyed.
    let nothing = ["--protection", "guarantee_nothing"];
    src.write("fs", "big", 4 << 20, 41);
    src.snap("fs", "s1");
    let out = send(&keys, &recv, &ds, &target, &nothing);
    assert!(out.status.success(), "{}", stderr(&out));
    zfs(&["bookmark", &format!("{ds}@s1"), &format!("{ds}#s1-mark")]);
    zfs(&["destroy", &format!("{ds}@s1")]);
    src.write("fs", "small", 10_000, 42);
    src.snap("fs", "s2");
    src.write("fs", "more", 10_000, 43);
    src.snap("fs", "s3");

    let out = send(&keys, &recv, &ds, &target, &nothing);
    assert!(out.status.success(), "{}", stderr(&out));
    sent_from_bookmark(&stderr(&out), &format!("{ds}#s1-mark"));
    let names: Vec<String> = snapshots(&target).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["s1", "s2", "s3"]);
    assert_eq!(snapshots(&ds), snapshots(&target)[1..]);
    assert_eq!(read(&target, "more"), read(&ds, "more"));
}

/// Properties (`--send-properties`): what was set on the source is set on the replica, and
/// changes follow with incrementals; the source's mountpoint, canmount and sharenfs never
/// apply on the receiver; the sender's `--recv-set-property`/`--recv-exclude-property` apply; what
/// the receiver forces or excludes wins; a raw stream's source keylocation is replaced by
/// `prompt`. A job asking for a property it may not set is refused at start. zfs-fuse's
/// receive can exclude nothing, so it refuses a stream with properties.
#[test]
fn properties_replicate_under_the_receivers_rules() {
    let Some(_zfs) = zfs_or_skip("properties") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let plain = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let refused = send(
        &keys,
        &plain,
        &src.name,
        &dst.name,
        &["--recv-set-property", "mountpoint=/etc"],
    );
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("mountpoint cannot be set"),
        "{}",
        stderr(&refused)
    );
    let ds = src.create("fs");
    let target = dst.ds("fs");
    src.write("fs", "a", 10_000, 81);
    let elsewhere = format!("/var/tmp/{}-elsewhere", src.name);
    for prop in [
        format!("mountpoint={elsewhere}"),
        "canmount=noauto".into(),
        "sharenfs=off".into(),
        "readonly=off".into(),
        "recordsize=64K".into(),
        "com.example:tag=hello".into(),
        "com.example:secret=s3cret".into(),
    ] {
        zfs(&["set", &prop, &ds]);
    }
    src.snap("fs", "s1");
    let job = [
        "--send-properties",
        "on",
        "--recv-set-property",
        "com.example:by=zq",
        "--recv-exclude-property",
        "recordsize",
    ];
    if !cheap_intermediates() {
        // zfs-fuse: its receive has no -x.
        let out = send(&keys, &plain, &ds, &target, &job);
        assert!(!out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("no zfs receive -x"),
            "{}",
            stderr(&out)
        );
        assert!(snapshots(&target).is_empty());
        return;
    }
    let recv = Recv::start_with_args(
        &keys,
        &[(&keys.send_fp, &dst.name)],
        &[
            "--force-property",
            "readonly=on",
            "--exclude-property",
            "com.example:secret",
        ],
    );
    let out = send(&keys, &recv, &ds, &target, &job);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(" -p"), "{}", stderr(&out));
    let value_source = |prop: &str| {
        zfs(&["get", "-H", "-o", "value,source", prop, &target])
            .trim()
            .to_string()
    };
    assert_eq!(value_source("com.example:tag"), "hello\treceived");
    assert_eq!(value_source("com.example:by"), "zq\tlocal");
    assert_eq!(
        value_source("readonly"),
        "on\tlocal",
        "the receiver's force wins"
    );
    assert_eq!(
        value_source("com.example:secret"),
        "-\t-",
        "excluded by the receiver"
    );
    for prop in ["mountpoint", "canmount", "sharenfs", "recordsize"] {
        let vs = value_source(prop);
        assert!(
            !vs.ends_with("\tlocal") && !vs.ends_with("\treceived"),
            "{prop} came from the source: {vs}"
        );
    }
    assert_ne!(get(&target, "mountpoint"), elsewhere);
    // A change on the source follows with the next snapshot.
    zfs(&["set", "com.example:tag=changed", &ds]);
    src.snap("fs", "s2");
    let out = send(&keys, &recv, &ds, &target, &job);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(value_source("com.example:tag"), "changed\treceived");
    assert_eq!(value_source("readonly"), "on\tlocal");
    assert_eq!(snapshots(&target), snapshots(&ds));

    // Raw: the source's key location never applies here.
    let key = key_file(&keys);
    let Some(enc) = create_encrypted(&src, "enc", Some(&key)) else {
        return;
    };
    src.snap("enc", "s1");
    let etarget = dst.ds("enc");
    let out = send(&keys, &recv, &enc, &etarget, &job);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("send=-w -p"), "{}", stderr(&out));
    assert_eq!(get(&etarget, "keylocation"), "prompt");
    assert_eq!(get(&etarget, "keystatus"), "unavailable");
    src.snap("enc", "s2");
    let out = send(&keys, &recv, &enc, &etarget, &job);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(get(&etarget, "keylocation"), "prompt");
    assert_eq!(snapshots(&etarget), snapshots(&enc));
}

/// zq's own cursor: after a run the source holds nothing and has one bookmark,
/// `#zq_<job>_<GUID>` of the snapshot the receiver committed. An operator destroys that
/// snapshot, and the next run is incremental from zq's bookmark; the cursor then moves on
/// (a bookmark of the new snapshot, the old one destroyed).
#[test]
fn zqs_cursor_bookmark_keeps_replication_incremental_after_its_snapshot_is_destroyed() {
    let Some(_zfs) = zfs_or_skip("cursor_bookmark") else {
        return;
    };
    if !supports("bookmarks") {
        return;
    }
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    assert!(cursors_are_bookmarks(&src.name));
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let ds = src.create("fs");
    let target = dst.ds("fs");
    let job = ["--job", "nightly"];
    src.write("fs", "big", 4 << 20, 71);
    src.snap("fs", "s1");
    let s1 = snapshots(&ds)[0].1;
    let out = send(&keys, &recv, &ds, &target, &job);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(held(&ds).is_empty(), "held on the source: {:?}", held(&ds));
    assert_eq!(cursor_marks(&ds), [format!("zq_nightly_{s1:016x}")]);
    assert_eq!(held(&target), ["s1"]);
    zfs(&["destroy", &format!("{ds}@s1")]);
    src.write("fs", "small", 10_000, 72);
    src.snap("fs", "s2");
    let s2 = snapshots(&ds)[0].1;

    let out = send(&keys, &recv, &ds, &target, &job);
    assert!(out.status.success(), "{}", stderr(&out));
    sent_from_bookmark(&stderr(&out), &format!("{ds}#zq_nightly_{s1:016x}"));
    assert_eq!(cursor_marks(&ds), [format!("zq_nightly_{s2:016x}")]);
    let names: Vec<String> = snapshots(&target).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["s1", "s2"]);
    assert_eq!(read(&target, "small"), read(&ds, "small"));
}

/// A receiver forces its properties on everything it receives (`zq-recv
/// --force-property`): set on a full and on an incremental receive, whatever the source
/// has, and set again after someone changed them on the destination. Bad values are
/// refused at start; zfs-fuse, whose receive takes no `-o`, refuses the option.
#[test]
fn a_receiver_forces_its_properties_on_every_receive() {
    let Some(_zfs) = zfs_or_skip("forced_properties") else {
        return;
    };
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let serve = |extra: &[&str]| {
        Command::new(RECV)
            .args([
                "serve",
                "--identity",
                keys.path(),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--allow", &format!("{}={}", keys.send_fp, dst.name)])
            .args(extra)
            .output()
            .unwrap()
    };
    for (bad, why) in [
        ("readonly", "expected PROP=VALUE"),
        ("keylocation=prompt", "cannot be forced"),
        ("Readonly=on", "not a property name"),
    ] {
        let out = serve(&["--force-property", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{bad}: {}", stderr(&out));
    }
    if !cheap_intermediates() {
        let out = serve(&["--force-property", "readonly=on"]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("no zfs receive -o"),
            "{}",
            stderr(&out)
        );
        return;
    }
    let forced = ["--force-property", "readonly=on"];
    let user = ["--force-property", "com.example:backup=yes"];
    let recv = Recv::start_with_args(
        &keys,
        &[(&keys.send_fp, &dst.name)],
        &[&forced[..], &user[..]].concat(),
    );
    let ds = src.create("fs");
    let target = dst.ds("fs");
    let get = |prop: &str| zfs(&["get", "-H", "-o", "value,source", prop, &target]);
    src.write("fs", "a", 10_000, 51);
    src.snap("fs", "s1");
    let out = send(&keys, &recv, &ds, &target, &[]);
    assert!(out.status.code() == Some(0), "{}", stderr(&out));
    assert_eq!(get("readonly").trim(), "on\tlocal");
    assert_eq!(get("com.example:backup").trim(), "yes\tlocal");
    // Someone turns it off on the destination; the next receive forces it again.
    zfs(&["set", "readonly=off", &target]);
    src.write("fs", "b", 10_000, 52);
    src.snap("fs", "s2");
    let out = send(&keys, &recv, &ds, &target, &[]);
    assert!(out.status.code() == Some(0), "{}", stderr(&out));
    assert_eq!(get("readonly").trim(), "on\tlocal");
    assert_eq!(snapshots(&target), snapshots(&ds));
    assert_eq!(read(&target, "b"), read(&ds, "b"));
}

/// The same in a running daemon: the snapshot it last replicated is destroyed on the
/// source with a bookmark of it left, and the next snapshot still goes incrementally, from
/// the bookmark, with no divergence reported.
#[test]
fn a_daemon_continues_from_a_bookmark_when_its_last_snapshot_is_destroyed() {
    let Some(_zfs) = zfs_or_skip("daemon_bookmark_base") else {
        return;
    };
    if !supports("bookmarks") {
        return;
    }
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let ds = src.create("fs");
    let target = dst.ds("fs");
    src.write("fs", "big", 4 << 20, 61);
    src.snap("fs", "s1");
    let args = ["--every", &dur("1s"), "--protection", "guarantee_nothing"];
    let daemon = Daemon::start(&keys, &recv, &ds, &target, &args);
    let has = |snap: &str| snapshots(&target).iter().any(|(n, _)| n == snap);
    assert!(
        wait_for(Duration::from_secs(60), || has("s1")),
        "s1 not replicated:\n{}",
        daemon.log_text()
    );
    zfs(&["bookmark", &format!("{ds}@s1"), &format!("{ds}#s1-mark")]);
    zfs(&["destroy", &format!("{ds}@s1")]);
    src.write("fs", "small", 10_000, 62);
    src.snap("fs", "s2");
    assert!(
        wait_for(Duration::from_secs(60), || has("s2")),
        "s2 not replicated:\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert!(log.contains("sending from its bookmark"), "{log}");
    assert!(!log.contains("diverged"), "{log}");
    assert_eq!(read(&target, "small"), read(&ds, "small"));
    assert_eq!(daemon.stop(Duration::from_secs(30)), Some(0));
}

/// A step from a bookmark (its snapshot destroyed on the source) that is cut resumes from
/// zfs's partial receive: `zfs send -t` finds the bookmark base by its GUID.
#[test]
fn an_interrupted_step_from_a_bookmark_resumes_from_zfs_partial_receive() {
    let Some(_zfs) = zfs_or_skip("bookmark_resume") else {
        return;
    };
    if !supports("bookmarks") || !supports("extensible_dataset") {
        return;
    }
    let (src, dst, keys) = (Pool::new("s"), Pool::new("d"), Keys::new());
    let recv = Recv::start(&keys, &[(&keys.send_fp, &dst.name)]);
    let ds = src.create("fs");
    let target = dst.ds("fs");
    let nothing = ["--protection", "guarantee_nothing"];
    src.write("fs", "small", 100_000, 71);
    src.snap("fs", "s1");
    let out = send(&keys, &recv, &ds, &target, &nothing);
    assert!(out.status.success(), "{}", stderr(&out));
    zfs(&["bookmark", &format!("{ds}@s1"), &format!("{ds}#s1-mark")]);
    zfs(&["destroy", &format!("{ds}@s1")]);
    src.write("fs", "big", 48 << 20, 72);
    src.snap("fs", "s2");
    let at = allocated(&dst.name) + (8 << 20);
    let every = dur("1s");
    let daemon = Daemon::start(
        &keys,
        &recv,
        &ds,
        &target,
        &slow_daemon_args(&every, &nothing),
    );
    interrupt(daemon, &keys, &dst, &ds, &target, at);

    let out = send(&keys, &recv, &ds, &target, &nothing);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("resumed from zfs send -t"), "{err}");
    assert!(logged(&err, "resumed_bytes") >= 1 << 20, "{err}");
    let names: Vec<String> = snapshots(&target).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["s1", "s2"]);
    assert_eq!(read(&target, "big"), read(&ds, "big"));
}
