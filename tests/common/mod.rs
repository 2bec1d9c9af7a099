//! Shared fixtures of the end-to-end tests: file-backed pools with unique names that are
//! destroyed even when a test fails, identities, and the real `zq-send`/`zq-recv` binaries.
//!
//! A test that needs ZFS starts with `let Some(_zfs) = zfs_or_skip("name") else { return };`.
//! Without root or ZFS it prints why and skips, unless `ZQ_REQUIRE_ZFS=1` (set by CI),
//! where it fails instead. On zfs-fuse the guard serializes ZFS tests across processes and
//! threads: zfs-fuse deadlocks when two datasets are created and mounted at the same time.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub const SEND: &str = env!("CARGO_BIN_EXE_zq-send");
pub const RECV: &str = env!("CARGO_BIN_EXE_zq-recv");

/// Runs `zfs`/`zpool` with `args`; panics with stderr on failure.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e}");
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `zfs send -I` is as cheap as `-i` here (OpenZFS, which answers `zfs version`);
/// on zfs-fuse zq sends short backlogs as a chain of `-i` steps instead.
#[allow(dead_code)]
pub fn cheap_intermediates() -> bool {
    static OPENZFS: OnceLock<bool> = OnceLock::new();
    *OPENZFS.get_or_init(|| {
        Command::new("zfs")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

pub fn zfs(args: &[&str]) -> String {
    sh("zfs", args)
}

fn can_use_zfs() -> Result<(), String> {
    // SAFETY-free check for root: zfs-fuse and zpool create need it.
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not running as root".into());
    }
    let zfs_fuse = Path::new("/usr/sbin/zfs-fuse").exists() || Path::new("/sbin/zfs-fuse").exists();
    // A wedged zfs-fuse does not answer: the test that holds the lock restarts it
    // (settle_zfs_fuse).
    if zfs_fuse && within(Command::new("zpool").arg("list"), Duration::from_secs(15)).is_none() {
        return Ok(());
    }
    let probe = |_: ()| Command::new("zpool").arg("list").output();
    let out = probe(()).map_err(|e| format!("zpool not installed: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    // zfs-fuse installed but its daemon not running: start it.
    if zfs_fuse {
        let _ = Command::new("zfs-fuse").status();
        for _ in 0..50 {
            if probe(()).map(|o| o.status.success()).unwrap_or(false) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Err(format!(
        "zpool list failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

const POOL_DIR: &str = "/var/tmp/zq-test-pools";

/// The size of each test pool's file. Tests that fill a pool ask for its `available`
/// space instead of assuming this.
pub const POOL_BYTES: u64 = 1 << 30;

/// How much slower than zfs-fuse on this host the ZFS under test is: the OpenZFS tier runs
/// in an emulated guest and sets `ZQ_TEST_TIME_SCALE` (e.g. 10). Every time limit a test
/// waits for ZFS work goes through [`scaled`], so the limits stay and still mean the same.
pub fn time_scale() -> f64 {
    static SCALE: OnceLock<f64> = OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var("ZQ_TEST_TIME_SCALE")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|f| f.is_finite() && *f >= 1.0)
            .unwrap_or(1.0)
    })
}

/// `limit` stretched by [`time_scale`].
pub fn scaled(limit: Duration) -> Duration {
    limit.mul_f64(time_scale())
}

/// A duration flag's value (`"1s"`, `"200ms"`) stretched by [`time_scale`]: a daemon's
/// periods and timeouts keep the same proportion to the speed of the ZFS under test.
pub fn dur(value: &str) -> String {
    let ms: f64 = match value.strip_suffix("ms") {
        Some(ms) => ms.parse().unwrap(),
        None => value.strip_suffix('s').unwrap().parse::<f64>().unwrap() * 1000.0,
    };
    format!("{}ms", (ms * time_scale()).round() as u64)
}

/// Exclusive use of ZFS for one test; declare it first so it is released last.
pub struct ZfsGuard {
    _lock: std::fs::File,
    _thread: Option<std::sync::MutexGuard<'static, ()>>,
}

/// `Some(guard)` if ZFS can be used. Otherwise prints why and returns `None` (skip), or
/// panics when `ZQ_REQUIRE_ZFS=1`.
pub fn zfs_or_skip(test: &str) -> Option<ZfsGuard> {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    static THREADS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Err(why) = AVAILABLE.get_or_init(can_use_zfs) {
        if std::env::var("ZQ_REQUIRE_ZFS").as_deref() == Ok("1") {
            panic!("{test}: ZFS is required (ZQ_REQUIRE_ZFS=1) but unavailable: {why}");
        }
        eprintln!(
            "SKIPPED {test}: needs root and ZFS ({why}); set ZQ_REQUIRE_ZFS=1 to fail instead"
        );
        return None;
    }
    std::fs::create_dir_all(POOL_DIR).unwrap();
    let lock = std::fs::File::create(Path::new(POOL_DIR).join(".lock")).unwrap();
    // OpenZFS mounts datasets concurrently: its tests share the lock (how many run at
    // once is nextest's to say). zfs-fuse deadlocks: one test at a time.
    if cheap_intermediates() {
        lock.lock_shared().unwrap();
        return Some(ZfsGuard {
            _lock: lock,
            _thread: None,
        });
    }
    let thread = THREADS.lock().unwrap_or_else(|p| p.into_inner());
    lock.lock().unwrap();
    settle_zfs_fuse(test);
    Some(ZfsGuard {
        _lock: lock,
        _thread: Some(thread),
    })
}

/// On zfs-fuse, makes sure nothing an earlier test left behind still works on ZFS when
/// this one starts: zfs-fuse deadlocks when two datasets are mounted at once, and a
/// deadlocked zfs-fuse fails every later test. Left behind are `zfs` processes (naming a
/// test pool) orphaned by a SIGKILLed zq (on purpose in the crash tests, or after a test's
/// own timeout) and the pools of a test process that died before destroying them. If
/// zfs-fuse is wedged (a leftover `zfs` cannot be killed, `zpool list` does not answer,
/// or a finished test's pool cannot be removed: seen in CI after the filtered-daemon
/// tests, cause unknown), it is restarted, loudly; panics, naming the cure, if that does
/// not help.
fn settle_zfs_fuse(test: &str) {
    // Only processes that name a test pool: nothing of anyone else's is waited for or
    // killed.
    let ours = r"^(zfs|zpool) .*zqt[0-9]+x";
    let strays = || {
        Command::new("pgrep")
            .args(["-a", "-f", ours])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let mut wedged = None;
    if !wait_for(Duration::from_secs(15), || strays().is_empty()) {
        eprintln!(
            "{test}: killing zfs processes an earlier test left running:\n{}",
            strays()
        );
        let _ = Command::new("pkill").args(["-9", "-f", ours]).status();
        if !wait_for(Duration::from_secs(5), || strays().is_empty()) {
            wedged = Some(format!("unkillable zfs processes:\n{}", strays()));
        }
    }
    if wedged.is_none() {
        wedged = remove_leftovers(test).err();
    }
    let Some(why) = wedged else {
        return;
    };
    eprintln!("{test}: zfs-fuse is wedged ({why}); restarting it");
    restart_zfs_fuse(test);
    if let Err(why) = remove_leftovers(test) {
        panic!(
            "{test}: zfs-fuse is still wedged after a restart ({why}). Restart it by hand: \
             pkill -9 zfs-fuse; rm /var/lib/zfs/zpool.cache; scripts/setup-zfs"
        );
    }
}

/// Removes the imported test pools whose creating process is gone. Fails, saying why,
/// if `zpool list` does not answer in 15 s or such a pool cannot be destroyed or exported
/// (within 10 s each).
fn remove_leftovers(test: &str) -> Result<(), String> {
    let mut zpool = Command::new("zpool")
        .args(["list", "-H", "-o", "name"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{test}: cannot run zpool: {e}"));
    let answered = wait_for(Duration::from_secs(15), || {
        matches!(zpool.try_wait(), Ok(Some(_)))
    });
    if !answered {
        let _ = zpool.kill();
        return Err("zpool list has not answered in 15 s".into());
    }
    let mut names = String::new();
    if let Some(mut out) = zpool.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut out, &mut names);
    }
    for pool in names.lines() {
        let Some(pid) = pool
            .strip_prefix("zqt")
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let gone = ["destroy", "export"].iter().any(|verb| {
            within(
                Command::new("zpool").args([verb, "-f", pool]),
                Duration::from_secs(10),
            )
            .is_some_and(|s| s.success())
        });
        if !gone {
            return Err(format!(
                "test pool {pool} of a finished test cannot be removed (or zpool hangs)"
            ));
        }
        let _ = std::fs::remove_file(Path::new(POOL_DIR).join(format!("{pool}.img")));
        eprintln!("{test}: removed test pool {pool} of a finished test");
    }
    Ok(())
}

/// Runs `cmd` (output discarded) for at most `limit`; `None` if it did not end by then
/// (it is killed, and not waited for: a process stuck in a wedged FUSE mount cannot die).
fn within(cmd: &mut Command, limit: Duration) -> Option<std::process::ExitStatus> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut status = None;
    wait_for(limit, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
    }
    status
}

/// Kills zfs-fuse, lazily unmounts what it had mounted (its mounts outlive it, dead) and
/// starts it again; it imports its pools anew from its cache.
fn restart_zfs_fuse(test: &str) {
    let _ = Command::new("pkill")
        .args(["-9", "-x", "zfs-fuse"])
        .status();
    let running = || {
        Command::new("pgrep")
            .args(["-x", "zfs-fuse"])
            .status()
            .is_ok_and(|s| s.success())
    };
    wait_for(Duration::from_secs(10), || !running());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if let [_, point, kind, ..] = fields[..] {
            if kind == "fuse.zfs" || (kind == "fuse" && point == "/zfs-kstat") {
                let _ = Command::new("umount").args(["-l", point]).status();
            }
        }
    }
    let up = || {
        Command::new("zpool")
            .arg("list")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // A daemon still shutting down makes a new one exit at once (as in scripts/setup-zfs).
    for _ in 0..3 {
        let _ = Command::new("zfs-fuse").status();
        if wait_for(Duration::from_secs(5), up) {
            eprintln!("{test}: zfs-fuse restarted");
            return;
        }
    }
    panic!("{test}: zfs-fuse did not start again; run scripts/setup-zfs");
}

/// A pool on a sparse file, destroyed on drop.
pub struct Pool {
    pub name: String,
    file: PathBuf,
}

impl Pool {
    pub fn new(tag: &str) -> Pool {
        Pool::with_options(tag, &[])
    }

    /// A pool made with `zpool create OPTIONS` (e.g. `-o feature@encryption=disabled`).
    pub fn with_options(tag: &str, options: &[&str]) -> Pool {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "zqt{}x{}{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let dir = PathBuf::from(POOL_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{name}.img"));
        let f = std::fs::File::create(&file).unwrap();
        // Sparse, so its size costs nothing. OpenZFS keeps back a slop of at least 128 MiB
        // of every pool (zfs-fuse far less): 1 GiB leaves ample room on both.
        f.set_len(POOL_BYTES).unwrap();
        let mut args = vec!["create"];
        args.extend(options);
        args.extend([name.as_str(), file.to_str().unwrap()]);
        sh("zpool", &args);
        Pool { name, file }
    }

    /// `pool/rel`.
    pub fn ds(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{rel}", self.name)
        }
    }

    /// Creates `pool/rel`.
    pub fn create(&self, rel: &str) -> String {
        let ds = self.ds(rel);
        zfs(&["create", "-p", &ds]);
        ds
    }

    /// Writes `bytes` of pseudo-random content to `file` in `pool/rel`, mounting it first
    /// if it is not (OpenZFS replicas are received unmounted).
    pub fn write(&self, rel: &str, file: &str, bytes: usize, seed: u64) {
        let mountpoint = mount(&self.ds(rel));
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Eight bytes per step: tests are built without optimisation, and in an emulated
        // guest a byte at a time cost seconds per 64 MiB.
        let mut data: Vec<u8> = Vec::with_capacity(bytes + 8);
        while data.len() < bytes {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(bytes);
        std::fs::write(mountpoint.join(file), data).unwrap();
    }

    /// The space `pool/rel` can still use, in bytes (`available`).
    pub fn available(&self, rel: &str) -> u64 {
        zfs(&["get", "-Hp", "-o", "value", "available", &self.ds(rel)])
            .trim()
            .parse()
            .unwrap()
    }

    /// Snapshot `pool/rel@snap`.
    pub fn snap(&self, rel: &str, snap: &str) {
        zfs(&["snapshot", &format!("{}@{snap}", self.ds(rel))]);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A zfs process orphaned by a SIGKILLed zq (crash tests) may still work on the
        // pool: the pool stays busy until it is done.
        wait_for(Duration::from_secs(10), || {
            !Command::new("pgrep")
                .args(["-f", &format!("^zfs .*{}", self.name)])
                .status()
                .is_ok_and(|s| s.success())
        });
        // zfs-fuse can report a pool busy for a moment after its last user exits.
        let mut last = String::new();
        for _ in 0..20 {
            match Command::new("zpool")
                .args(["destroy", "-f", &self.name])
                .output()
            {
                Ok(o) if o.status.success() => {
                    let _ = std::fs::remove_file(&self.file);
                    return;
                }
                Ok(o) => last = String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        // zfs-fuse sometimes keeps refusing ("could not unmount datasets") for a dataset
        // it no longer has mounted; exporting still takes the pool away.
        let exported = Command::new("zpool")
            .args(["export", "-f", &self.name])
            .status()
            .is_ok_and(|s| s.success());
        if exported {
            let _ = std::fs::remove_file(&self.file);
            eprintln!(
                "note: test pool {} exported, not destroyed: {last}",
                self.name
            );
            return;
        }
        eprintln!("WARNING: could not destroy test pool {}: {last}", self.name);
    }
}

/// Whether zq's replication cursors on `pool` are bookmarks: the platform has bookmarks
/// and the pool the feature (asked of `zpool`, whose `feature@` properties zfs-fuse lacks).
pub fn cursors_are_bookmarks(pool: &str) -> bool {
    Command::new("zpool")
        .args(["get", "-H", "-o", "value", "feature@bookmarks", pool])
        .output()
        .is_ok_and(|o| {
            let v = String::from_utf8_lossy(&o.stdout);
            o.status.success() && (v.trim() == "enabled" || v.trim() == "active")
        })
}

/// zq's cursor bookmarks on `dataset` (names after '#' starting `zq_`), oldest first;
/// empty where zfs has no bookmarks.
pub fn cursor_marks(dataset: &str) -> Vec<String> {
    let out = Command::new("zfs")
        .args([
            "list",
            "-H",
            "-o",
            "name",
            "-s",
            "createtxg",
            "-t",
            "bookmark",
            "-d",
            "1",
            dataset,
        ])
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('#'))
        .filter(|(ds, name)| *ds == dataset && name.starts_with("zq_"))
        .map(|(_, name)| name.to_string())
        .collect()
}

/// The snapshots of `dataset` that have user holds (`userrefs` > 0), by name after '@'.
pub fn held(dataset: &str) -> Vec<String> {
    zfs(&["get", "-H", "-o", "name,value", "-r", "userrefs", dataset])
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(name, n)| name.starts_with(&format!("{dataset}@")) && *n != "0" && *n != "-")
        .map(|(name, _)| name.split_once('@').unwrap().1.to_string())
        .collect()
}

/// `(snapshot name, guid)` of `dataset`, oldest first; empty if it does not exist.
pub fn snapshots(dataset: &str) -> Vec<(String, u64)> {
    snapshots_of("-d1", dataset)
        .remove(dataset)
        .unwrap_or_default()
}

/// The snapshots of every dataset under `root` (itself included) by dataset, each oldest
/// first, from one `zfs` call: tests that watch a tree use this so that their polling does
/// not load zfs-fuse with a call per dataset.
pub fn snapshot_tree(root: &str) -> BTreeMap<String, Vec<(String, u64)>> {
    snapshots_of("-r", root)
}

fn snapshots_of(depth: &str, dataset: &str) -> BTreeMap<String, Vec<(String, u64)>> {
    let out = Command::new("zfs")
        .args(["get", "-Hp", depth, "-o", "name,property,value"])
        .args(["guid,createtxg", dataset])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // dataset -> snapshot -> (guid, createtxg)
    let mut rows: BTreeMap<String, BTreeMap<String, (u64, u64)>> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let Some((dataset, snap)) = f[0].split_once('@') else {
            continue;
        };
        let v: u64 = f[2].parse().unwrap();
        let row = rows
            .entry(dataset.to_string())
            .or_default()
            .entry(snap.to_string())
            .or_default();
        if f[1] == "guid" {
            row.0 = v;
        } else {
            row.1 = v;
        }
    }
    rows.into_iter()
        .map(|(dataset, snaps)| {
            let mut v: Vec<_> = snaps.into_iter().collect();
            v.sort_by_key(|(_, (_, txg))| *txg);
            (dataset, v.into_iter().map(|(n, (g, _))| (n, g)).collect())
        })
        .collect()
}

/// Every dataset (filesystems only) under `root`, sorted.
pub fn datasets(root: &str) -> Vec<String> {
    let out = Command::new("zfs")
        .args(["list", "-H", "-o", "name", "-t", "filesystem", "-r", root])
        .output()
        .unwrap();
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// Sender and receiver identities in a temporary directory.
pub struct Keys {
    pub dir: tempfile::TempDir,
    pub send_fp: String,
    pub recv_fp: String,
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let keygen = |bin: &str| {
            let out = Command::new(bin)
                .arg("keygen")
                .arg(dir.path())
                .output()
                .unwrap();
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        let send_fp = keygen(SEND);
        let recv_fp = keygen(RECV);
        Keys {
            dir,
            send_fp,
            recv_fp,
        }
    }

    pub fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }
}

/// A running `zq-recv serve`, stopped on drop.
pub struct Recv {
    child: Child,
    pub addr: String,
    /// stderr, where it is captured ([`Recv::socket_activated`], [`Recv::start_logged`]).
    pub log: Arc<Mutex<String>>,
}

impl Recv {
    /// Starts a receiver allowing each `(fingerprint, root)`.
    pub fn start(keys: &Keys, allow: &[(&str, &str)]) -> Recv {
        Recv::start_on(keys, allow, "127.0.0.1:0")
    }

    /// Starts a receiver on `listen` (e.g. the address of one that was killed).
    pub fn start_on(keys: &Keys, allow: &[(&str, &str)], listen: &str) -> Recv {
        Recv::start_with_env(keys, allow, listen, &[])
    }

    /// [`Recv::start_on`] with environment variables set (e.g. a fault injection).
    pub fn start_with_env(
        keys: &Keys,
        allow: &[(&str, &str)],
        listen: &str,
        env: &[(&str, &str)],
    ) -> Recv {
        Recv::spawn(keys, allow, listen, env, &[])
    }

    /// [`Recv::start`] with more options for `serve`.
    pub fn start_with_args(keys: &Keys, allow: &[(&str, &str)], extra: &[&str]) -> Recv {
        Recv::spawn(keys, allow, "127.0.0.1:0", &[], extra)
    }

    fn spawn(
        keys: &Keys,
        allow: &[(&str, &str)],
        listen: &str,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Recv {
        let mut cmd = Command::new(RECV);
        cmd.envs(env.iter().copied());
        cmd.args(["serve", "--listen", listen])
            .args(serve_args(keys, allow))
            .args(extra);
        Recv::spawn_command(cmd)
    }

    /// [`Recv::start`] with `global` options before `serve` (e.g. `--log-format json`) and
    /// `env` set, its stderr kept in [`Recv::log`] (and passed on).
    pub fn start_logged(
        keys: &Keys,
        allow: &[(&str, &str)],
        global: &[&str],
        env: &[(&str, &str)],
    ) -> Recv {
        let mut cmd = Command::new(RECV);
        cmd.envs(env.iter().copied())
            .args(global)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(serve_args(keys, allow));
        let (child, addr, log) = spawn_listening_kept(cmd, true);
        Recv { child, addr, log }
    }

    /// Starts `cmd` (a `zq-recv serve …`) and waits for the address it listens on.
    pub fn spawn_command(cmd: Command) -> Recv {
        let (child, addr) = spawn_listening(cmd);
        Recv {
            child,
            addr,
            log: Arc::default(),
        }
    }
}

/// Starts `cmd` (a `zq-recv serve` or `zq-send serve`, which print `listening on ADDR`
/// first) and returns it with that address.
pub fn spawn_listening(cmd: Command) -> (Child, String) {
    let (child, addr, _) = spawn_listening_kept(cmd, false);
    (child, addr)
}

/// [`spawn_listening`], with the child's stderr kept (and passed on) if `keep`, else
/// inherited (the log is then empty).
fn spawn_listening_kept(mut cmd: Command, keep: bool) -> (Child, String, Arc<Mutex<String>>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(if keep {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .unwrap();
    // Read from before the address is: the pipe must never fill.
    let log = match child.stderr.take() {
        Some(stderr) => keep_log(stderr),
        None => Arc::default(),
    };
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected output {line:?} of {cmd:?}"))
        .to_string();
    (child, addr, log)
}

/// What a child prints on `stderr`, kept and passed on by a thread of its own (the pipe
/// must never fill).
fn keep_log(stderr: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if let Ok(mut k) = kept.lock() {
                k.push_str(&line);
                k.push('\n');
            }
        }
    });
    log
}

/// `zq-recv serve`'s options but --listen.
fn serve_args(keys: &Keys, allow: &[(&str, &str)]) -> Vec<String> {
    let mut args: Vec<String> = vec!["--identity".into(), keys.path().into()];
    // Kept across restarts of the receiver, like /var/lib/zq-recv/spool.
    let spool = format!("{}/spool", keys.path());
    args.extend([
        "--spool-dir".into(),
        spool,
        "--spool-from".into(),
        "1MiB".into(),
    ]);
    for (fp, root) in allow {
        args.extend(["--allow".into(), format!("{fp}={root}")]);
    }
    args
}

/// `systemd-socket-activate`, from Debian's systemd package: `Some(path)`, or `None` when
/// missing and the test may skip (panics under `ZQ_REQUIRE_ZFS=1`, like the ZFS tier).
pub fn socket_activate_or_skip(test: &str) -> Option<&'static str> {
    const PROGRAM: &str = "systemd-socket-activate";
    if Command::new(PROGRAM).arg("--version").output().is_ok() {
        return Some(PROGRAM);
    }
    if std::env::var("ZQ_REQUIRE_ZFS").as_deref() == Ok("1") {
        panic!("{test}: {PROGRAM} is required (ZQ_REQUIRE_ZFS=1); apt-get install systemd");
    }
    eprintln!("SKIPPED {test}: needs {PROGRAM} (Debian's systemd package)");
    None
}

impl Recv {
    /// `zq-recv serve ARGS` under `systemd-socket-activate --datagram` on a free loopback
    /// port: systemd's tool binds the socket and starts zq-recv (same PID) with it on the
    /// first datagram, as `zq-recv.socket` does. `extra` goes after `serve`.
    pub fn socket_activated(
        keys: &Keys,
        allow: &[(&str, &str)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Recv {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.args(["--datagram", "-l", &addr]);
        // It passes only what -E names on to the program (besides LISTEN_*).
        for (k, v) in env {
            cmd.arg("-E").arg(format!("{k}={v}"));
        }
        let mut child = cmd
            .args([RECV, "serve"])
            .args(extra)
            .args(serve_args(keys, allow))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // "Listening on 127.0.0.1:PORT as 3." once the socket is bound; then zq-recv's
        // logs, kept and passed on (the pipe must never fill).
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(line.starts_with("Listening on"), "{line:?}");
        let log = keep_log(stderr);
        Recv { child, addr, log }
    }

    /// Waits for the process to exit (at most `within`).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + scaled(within);
        while std::time::Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM, as systemd's stop does.
    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

/// The bytes allocated in `pool` (`zpool list -Hp`, OpenZFS; 0 where that fails).
pub fn allocated(pool: &str) -> u64 {
    Command::new("zpool")
        .args(["list", "-Hp", "-o", "allocated", pool])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes the receivers started with `keys` hold in spool files.
pub fn spooled(keys: &Keys) -> u64 {
    std::fs::read_dir(format!("{}/spool", keys.path()))
        .map(|dir| {
            dir.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "zs"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl Recv {
    /// SIGKILL, as a crash or power loss would.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Recv {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// SIGTERM, then SIGKILL after 5 s. zq exits cleanly on SIGTERM and reaps its `zfs`
/// children; a SIGKILL alone would orphan them, still working on pools being destroyed.
fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `zq-send run SOURCE ADDR TARGET --identity .. --peer .. EXTRA...`.
pub fn send(keys: &Keys, recv: &Recv, source: &str, target: &str, extra: &[&str]) -> Output {
    send_with_peer(keys, &keys.recv_fp, recv, source, target, extra)
}

pub fn send_with_peer(
    keys: &Keys,
    peer: &str,
    recv: &Recv,
    source: &str,
    target: &str,
    extra: &[&str],
) -> Output {
    let out = Command::new(SEND)
        .args([
            "run",
            source,
            &recv.addr,
            target,
            "--identity",
            keys.path(),
            "--peer",
            peer,
        ])
        .args(extra)
        .output()
        .unwrap();
    eprintln!(
        "zq-send {source} -> {target} {extra:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Reads a file from a dataset's mountpoint. Reading a mounted replica updates atime, which
/// makes ZFS refuse the next incremental into it ("modified since most recent snapshot"), so
/// tests read replicas only after their last receive. (zfs-fuse has no `.zfs/snapshot`,
/// and hangs mounting a dataset that inherits `atime=off`.)
pub fn read(dataset: &str, file: &str) -> Vec<u8> {
    std::fs::read(mount(dataset).join(file)).unwrap()
}

/// Mounts `dataset` unless it is mounted (OpenZFS receives with -u; zfs-fuse mounts what
/// it receives) and returns where: the platform says, not the test.
pub fn mount(dataset: &str) -> PathBuf {
    let mounted = || zfs(&["get", "-H", "-o", "value", "mounted", dataset]).trim() == "yes";
    if !mounted() {
        let out = Command::new("zfs")
            .args(["mount", dataset])
            .output()
            .unwrap();
        // zfs-fuse mounts what it receives by itself, a moment later: "busy" meanwhile.
        assert!(
            out.status.success() || wait_for(Duration::from_secs(10), mounted),
            "cannot mount {dataset}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    PathBuf::from(zfs(&["get", "-H", "-o", "value", "mountpoint", dataset]).trim())
}

/// A `zq-send run ... --every` daemon with its stderr in a file; stopped on drop.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
    /// Its `--status-file`.
    pub status: PathBuf,
}

impl Daemon {
    pub fn start(keys: &Keys, recv: &Recv, source: &str, target: &str, extra: &[&str]) -> Daemon {
        Daemon::start_with_env(keys, &recv.addr, source, target, extra, &[])
    }

    /// [`Daemon::start`] to the receiver at `addr` (e.g. a [`Relay`]) with environment
    /// variables set (e.g. a fault injection).
    pub fn start_with_env(
        keys: &Keys,
        addr: &str,
        source: &str,
        target: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let status = keys.dir.path().join("status.json");
        let mut cmd = Command::new(SEND);
        cmd.args(["run", source, addr, target, "--identity", keys.path()])
            .args(["--peer", &keys.recv_fp])
            .arg("--status-file")
            .arg(&status)
            .args(extra)
            .envs(env.iter().copied());
        Daemon::spawn_command(cmd, keys, status)
    }

    /// Starts `cmd` (a `zq-send run …` daemon writing its status to `status`), logging
    /// to a file next to `keys`.
    pub fn spawn_command(mut cmd: Command, keys: &Keys, status: PathBuf) -> Daemon {
        let log = keys.dir.path().join("daemon.log");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log, status }
    }

    /// `zq-send status --json` of this daemon, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(SEND)
            .arg("status")
            .arg(&self.status)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "zq-send status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// SIGTERM, then waits up to `within` for a clean exit; returns the exit code.
    pub fn stop(mut self, within: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + scaled(within);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("daemon did not exit within {within:?} of SIGTERM");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 60 s) until the receivers started with `keys` hold `bytes` of spool:
    /// a large step is far enough along to be interrupted and resumed. Panics with the log.
    pub fn await_spooled(&self, keys: &Keys, bytes: u64) {
        assert!(
            wait_for(Duration::from_secs(60), || spooled(keys) >= bytes),
            "the receiver never spooled {bytes} bytes:\n{}",
            self.log_text()
        );
    }

    /// Waits (up to 60 s) until the step in flight is far enough along to be interrupted
    /// and resumed, whichever way this platform resumes: `bytes` in the receiver's spool
    /// (zfs-fuse), or where zfs keeps a partial receive itself (OpenZFS, no spool), `bytes`
    /// allocated in the destination pool `dst` (zfs writes what it received with each
    /// transaction group: each look forces one with `zpool sync`). Panics with the log.
    pub fn await_transferred(&self, keys: &Keys, dst: &Pool, bytes: u64) {
        let openzfs = cheap_intermediates();
        // Unsynced, a slow guest's pool showed the step's bytes only once the step was
        // done, and the kill came too late.
        let synced = || {
            let _ = Command::new("zpool").args(["sync", &dst.name]).status();
            allocated(&dst.name)
        };
        let far = || spooled(keys) >= bytes || (openzfs && synced() >= bytes);
        assert!(
            wait_for_every(Duration::from_secs(60), Duration::from_millis(500), far),
            "the step never got {bytes} bytes along:\n{}",
            self.log_text()
        );
    }

    /// Whether the log contains `needle` within `limit` (a line can follow the event it
    /// reports, e.g. the sender's commit log after the receiver's commit).
    pub fn logs_within(&self, limit: Duration, needle: &str) -> bool {
        wait_for(limit, || self.log_text().contains(needle))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would: no step is finished or aborted cleanly.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Whether a `zfs receive` into `target` is running (a transfer is in flight).
pub fn receiving(target: &str) -> bool {
    Command::new("pgrep")
        .args(["-f", &format!("zfs receive.* {target}$")])
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// How many source snapshots are newer than the destination's newest (by GUID); the whole
/// source count if the destination has none of them.
pub fn lag(source: &str, target: &str) -> usize {
    lag_of(&snapshots(source), &snapshots(target))
}

/// [`lag`] of two listings.
pub fn lag_of(src: &[(String, u64)], dst: &[(String, u64)]) -> usize {
    match dst
        .last()
        .and_then(|(_, g)| src.iter().position(|(_, s)| s == g))
    {
        Some(pos) => src.len() - 1 - pos,
        None => src.len(),
    }
}

/// Polls `cond` every 100 ms for up to `limit`.
pub fn wait_for(limit: Duration, cond: impl FnMut() -> bool) -> bool {
    wait_for_every(limit, Duration::from_millis(100), cond)
}

/// Polls `cond` every `every` for up to `limit`. Tests that watch a running daemon poll
/// slowly: on zfs-fuse every listing competes with the replication under test.
/// `limit` is stretched by [`time_scale`].
pub fn wait_for_every(limit: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + scaled(limit);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(every);
    }
    cond()
}

/// A UDP relay on loopback between one sender and a receiver, which drops every datagram
/// in both directions while it is cut: a network outage without touching either process.
pub struct Relay {
    pub addr: String,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Relays to the receiver at `to`.
    pub fn start(to: &str) -> Relay {
        use std::net::UdpSocket;
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(to).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let addr = front.local_addr().unwrap().to_string();
        let (cut, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let client = Arc::new(Mutex::new(None::<std::net::SocketAddr>));
        let (front2, back2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let (cut1, stop1, client1) = (cut.clone(), stop.clone(), client.clone());
        let up = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop1.load(Ordering::SeqCst) {
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    *client1.lock().unwrap() = Some(from);
                    if !cut1.load(Ordering::SeqCst) {
                        let _ = back.send(&buf[..n]);
                    }
                }
            }
        });
        let (cut2, stop2) = (cut.clone(), stop.clone());
        let down = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::SeqCst) {
                if let Ok(n) = back2.recv(&mut buf) {
                    let to = *client.lock().unwrap();
                    if let (false, Some(to)) = (cut2.load(Ordering::SeqCst), to) {
                        let _ = front2.send_to(&buf[..n], to);
                    }
                }
            }
        });
        Relay {
            addr,
            cut,
            stop,
            threads: vec![up, down],
        }
    }

    /// Drops everything from now on (`true`) or relays again (`false`).
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
