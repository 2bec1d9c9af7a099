//! Resumable steps without `zfs receive -s`: the receiver keeps the verified bytes of a
//! large step's stream in a spool file, so that an interrupted step (connection lost,
//! either side killed, a corrupted chunk) continues where it stopped instead of sending
//! everything again.
//!
//! `zfs receive` still reads the stream as it arrives: the spool is a copy of the verified
//! prefix, written alongside. After an interruption the receiver reports a
//! [`ResumeToken`] (step, offset, BLAKE3 of the prefix) in its listing; the sender
//! regenerates the same `zfs send` stream, checks its prefix against the hash and sends the
//! rest after a `StepStart` that says where it resumes. The receiver checks its spool file against the hash again
//! before it replays it into a new `zfs receive`, so a spool changed on disk (a flipped
//! bit) is never fed to zfs: the step is rejected and sent afresh. A stream's END record
//! is always in the data that follows, so nothing is committed until the whole stream has
//! been verified (`zq_proto::transfer`).
//!
//! A step is spooled once it passes `from` bytes (the first ones are kept in memory until
//! then), and at most `max` bytes of it; a spool write error (a full disk) stops spooling
//! that step with a warning, never the step. Files: `<dir>/<key>.meta` (JSON: which step)
//! and `<dir>/<key>.zs` (the prefix), `key` derived from the target's name; a new step
//! into a target, or a committed one, removes them.

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use zq_proto::{ErrorKind, ResumeAt, ResumeToken, SnapRef, StepHeader, WireError};
use zq_store::DatasetName;

/// Where and when to spool.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory of the spool files (created 0700 if missing).
    pub dir: PathBuf,
    /// Steps are spooled once their stream passes this many bytes (held in memory until
    /// then, per step).
    pub from: u64,
    /// At most this many bytes of one step are spooled; the rest of a longer step is not
    /// resumable beyond that point.
    pub max: u64,
}

impl SpoolConfig {
    /// Steps from 4 MiB on are spooled, up to 64 GiB of each.
    pub const DEFAULT_FROM: u64 = 4 << 20;
    /// See [`Self::DEFAULT_FROM`].
    pub const DEFAULT_MAX: u64 = 64 << 30;
}

/// Which step a spool belongs to (the `.meta` file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    target: String,
    from_guid: Option<u64>,
    to_name: String,
    /// From the stream's BEGIN record; 0 for an `-I` stream.
    to_guid: u64,
    intermediates: bool,
}

impl Meta {
    fn of(h: &StepHeader, to_guid: u64) -> Meta {
        Meta {
            target: h.target.clone(),
            from_guid: h.from.as_ref().map(|f| f.guid),
            to_name: h.to.name.clone(),
            to_guid,
            intermediates: h.intermediates,
        }
    }

    /// Whether `h` announces the step this spool holds.
    fn matches(&self, h: &StepHeader) -> bool {
        self.target == h.target
            && self.from_guid == h.from.as_ref().map(|f| f.guid)
            && self.to_name == h.to.name
            && (h.to.guid == 0 || self.to_guid == 0 || self.to_guid == h.to.guid)
            && self.intermediates == h.intermediates
    }
}

/// The spools of one receiver.
#[derive(Debug)]
pub struct Spools {
    config: Option<SpoolConfig>,
    /// Length and hash of a spool as a token last read it, so the next needs no reading.
    known: Mutex<HashMap<String, (u64, [u8; 32])>>,
}

impl Spools {
    /// Spools in `config.dir`; `None` disables spooling (every interrupted step restarts).
    pub fn new(config: Option<SpoolConfig>) -> std::io::Result<Self> {
        if let Some(c) = &config {
            std::fs::create_dir_all(&c.dir)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&c.dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        Ok(Spools {
            config,
            known: Mutex::new(HashMap::new()),
        })
    }

    /// No spooling.
    pub fn disabled() -> Self {
        Spools {
            config: None,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// Whether spooling is on.
    pub fn enabled(&self) -> bool {
        self.config.is_some()
    }

    fn paths(&self, target: &str) -> Option<(PathBuf, PathBuf)> {
        let dir = &self.config.as_ref()?.dir;
        let key = blake3::hash(target.as_bytes()).to_hex();
        let key = &key.as_str()[..32];
        Some((
            dir.join(format!("{key}.meta")),
            dir.join(format!("{key}.zs")),
        ))
    }

    fn forget(&self, target: &str) {
        if let Ok(mut k) = self.known.lock() {
            k.remove(target);
        }
    }

    /// Removes `target`'s spool, if any.
    pub fn discard(&self, target: &DatasetName) {
        self.forget(target.as_str());
        if let Some((meta, data)) = self.paths(target.as_str()) {
            for p in [meta, data] {
                match std::fs::remove_file(&p) {
                    Ok(()) => debug!(path = %p.display(), "spool removed"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => warn!(path = %p.display(), error = %e, "cannot remove spool file"),
                }
            }
        }
    }

    /// The resume token of `target`'s spool, if it holds any bytes. Hashes the spool file
    /// (on tokio's blocking pool) unless a token of the same spool already did.
    pub async fn token(&self, target: &str) -> Option<ResumeToken> {
        let (meta_path, data_path) = self.paths(target)?;
        let meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path).ok()?).ok()?;
        if meta.target != target {
            return None;
        }
        let cached = self.known.lock().ok()?.get(target).copied();
        let len = std::fs::metadata(&data_path).ok()?.len();
        let (offset, prefix_hash) = match cached {
            Some((l, h)) if l == len => (l, h),
            _ => {
                let hashed = tokio::task::spawn_blocking(move || hash_file(&data_path, len))
                    .await
                    .ok()?;
                match hashed {
                    Ok(h) => (len, h),
                    Err(e) => {
                        warn!(%target, error = %e, "cannot read spool");
                        return None;
                    }
                }
            }
        };
        if offset == 0 {
            return None;
        }
        if let Ok(mut k) = self.known.lock() {
            k.insert(target.to_string(), (offset, prefix_hash));
        }
        Some(ResumeToken {
            dataset: meta.target,
            from_guid: meta.from_guid,
            to: SnapRef {
                name: meta.to_name,
                guid: meta.to_guid,
            },
            intermediates: meta.intermediates,
            offset,
            prefix_hash,
        })
    }

    /// The resume tokens of every spool for `root` or, if `recursive`, inside it. A target
    /// need not exist: an interrupted full stream leaves none.
    pub async fn tokens_under(&self, root: &DatasetName, recursive: bool) -> Vec<ResumeToken> {
        let Some(config) = &self.config else {
            return Vec::new();
        };
        let Ok(dir) = std::fs::read_dir(&config.dir) else {
            return Vec::new();
        };
        let mut targets: Vec<String> = dir
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "meta"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<Meta>(&b).ok())
            .map(|m| m.target)
            .filter(|t| {
                DatasetName::parse(t)
                    .is_ok_and(|ds| &ds == root || (recursive && ds.is_within(root)))
            })
            .collect();
        targets.sort();
        let mut tokens = Vec::new();
        for t in targets {
            tokens.extend(self.token(&t).await);
        }
        tokens
    }

    /// A writer for a fresh step into `target` (removing an older spool of it), or `None`
    /// when spooling is off.
    pub fn writer(&self, h: &StepHeader, target: &DatasetName) -> Option<SpoolWriter> {
        self.discard(target);
        let config = self.config.as_ref()?;
        let (meta, data) = self.paths(target.as_str())?;
        Some(SpoolWriter {
            target: target.to_string(),
            meta_path: meta,
            data_path: data,
            header: h.clone(),
            to_guid: 0,
            from: config.from,
            max: config.max,
            state: State::Buffering(Vec::new()),
            len: 0,
        })
    }

    /// Opens the spool a resumed step (`h`, continuing `at`) needs: it must hold this step, at least
    /// `offset` bytes, and those bytes must hash to `prefix_hash` (checked by reading them
    /// now: a spool changed on disk is never replayed). Returns the prefix's reader and a
    /// writer that appends to the spool. Any mismatch discards the spool.
    pub async fn resume(
        &self,
        h: &StepHeader,
        at: ResumeAt,
        target: &DatasetName,
    ) -> Result<(Replay, SpoolWriter), WireError> {
        let reject = |why: String| {
            self.discard(target);
            WireError::new(
                ErrorKind::ResumeRejected,
                format!("cannot resume the step into {target}: {why}; send it afresh"),
            )
        };
        let (Some(config), Some((meta_path, data_path))) =
            (self.config.as_ref(), self.paths(target.as_str()))
        else {
            return Err(reject("this receiver does not spool".into()));
        };
        let meta: Meta = match std::fs::read(&meta_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(m) => m,
            Err(e) => return Err(reject(format!("no usable spool ({e})"))),
        };
        if !meta.matches(h) {
            return Err(reject(format!(
                "the spool holds another step (to @{})",
                meta.to_name
            )));
        }
        let (offset, want) = (at.offset, at.prefix_hash);
        let path = data_path.clone();
        let checked =
            tokio::task::spawn_blocking(move || -> std::io::Result<Result<(), String>> {
                let len = std::fs::metadata(&path)?.len();
                if len < offset {
                    return Ok(Err(format!("the spool holds {len} bytes, not {offset}")));
                }
                if hash_file(&path, offset)? != want {
                    return Ok(Err(format!(
                        "the spool's first {offset} bytes do not match the sender's hash"
                    )));
                }
                Ok(Ok(()))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match checked {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(reject(why)),
            Err(e) => return Err(reject(format!("cannot read the spool: {e}"))),
        }
        let open = || -> std::io::Result<(std::fs::File, std::fs::File)> {
            let reader = std::fs::File::open(&data_path)?;
            let mut writer = std::fs::OpenOptions::new().write(true).open(&data_path)?;
            // Bytes past the offset were never confirmed to the sender: drop them.
            writer.set_len(offset)?;
            writer.seek(std::io::SeekFrom::End(0))?;
            Ok((reader, writer))
        };
        let (reader, file) = open().map_err(|e| reject(format!("cannot open the spool: {e}")))?;
        self.forget(target.as_str());
        info!(%target, offset, "resuming a spooled step");
        Ok((
            Replay {
                file: reader.take(offset),
            },
            SpoolWriter {
                target: target.to_string(),
                meta_path,
                data_path,
                header: h.clone(),
                to_guid: meta.to_guid,
                from: config.from,
                max: config.max,
                state: if offset >= config.max {
                    State::Stopped
                } else {
                    State::Writing(file)
                },
                len: offset,
            },
        ))
    }

    /// After a failed step: keep what its writer spooled, for a resume.
    pub fn keep(&self, w: SpoolWriter) {
        if let State::Writing(f) = &w.state {
            if let Err(e) = f.sync_data() {
                warn!(target = %w.target, error = %e, "cannot sync spool");
            }
        }
        if w.len > 0 && !matches!(w.state, State::Buffering(_)) {
            info!(target = %w.target, bytes = w.len, "step spooled for a resume");
            // The next token hashes the file: once per interruption, instead of a second
            // BLAKE3 pass over every spooled byte while the stream arrives.
            if let Ok(mut k) = self.known.lock() {
                k.remove(&w.target);
            }
        }
    }
}

/// BLAKE3 of the first `len` bytes of `path`.
fn hash_file(path: &Path, len: u64) -> std::io::Result<[u8; 32]> {
    let mut f = std::fs::File::open(path)?.take(len);
    let mut h = blake3::Hasher::new();
    let n = std::io::copy(&mut f, &mut h)?;
    if n != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("spool holds {n} bytes, expected {len}"),
        ));
    }
    Ok(*h.finalize().as_bytes())
}

enum State {
    /// Below `from`: the chunks so far, in memory.
    Buffering(Vec<Bytes>),
    Writing(std::fs::File),
    /// Past `max`, or a write failed.
    Stopped,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Buffering(_) => "Buffering",
            State::Writing(_) => "Writing",
            State::Stopped => "Stopped",
        })
    }
}

/// Copies one step's verified bytes to its spool.
#[derive(Debug)]
pub struct SpoolWriter {
    target: String,
    meta_path: PathBuf,
    data_path: PathBuf,
    header: StepHeader,
    to_guid: u64,
    from: u64,
    max: u64,
    state: State,
    len: u64,
}

/// The spooled prefix of a resumed step, read in chunks.
#[derive(Debug)]
pub struct Replay {
    file: std::io::Take<std::fs::File>,
}

impl SpoolWriter {
    /// Records the GUID the stream's BEGIN record names (the header may leave it 0).
    pub fn set_to_guid(&mut self, guid: u64) {
        self.to_guid = guid;
    }

    /// Copies verified `data`, the stream's next bytes.
    pub fn write(&mut self, data: &Bytes) {
        match &mut self.state {
            State::Stopped => {}
            State::Buffering(held) => {
                self.len += data.len() as u64;
                held.push(data.clone());
                if self.len >= self.from {
                    let held = std::mem::take(held);
                    self.state = match self.create(&held) {
                        Ok(f) => State::Writing(f),
                        Err(e) => self.stop(e),
                    };
                }
            }
            State::Writing(f) => {
                let room = usize::try_from(self.max.saturating_sub(self.len)).unwrap_or(usize::MAX);
                let part = &data[..data.len().min(room)];
                if let Err(e) = f.write_all(part) {
                    self.state = self.stop(e);
                    return;
                }
                self.len += part.len() as u64;
                if part.len() < data.len() {
                    debug!(target = %self.target, max = self.max, "spool full; the rest of this step is not resumable");
                    self.state = State::Stopped;
                }
            }
        }
    }

    fn create(&self, held: &[Bytes]) -> std::io::Result<std::fs::File> {
        let meta = serde_json::to_vec(&Meta::of(&self.header, self.to_guid))?;
        write_new(&self.meta_path, &meta)?;
        let mut options = std::fs::OpenOptions::new();
        options.create(true).truncate(true).write(true);
        // The spool holds the replicated data: readable by the receiver only.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&self.data_path)?;
        for d in held {
            f.write_all(d)?;
        }
        Ok(f)
    }

    fn stop(&mut self, e: std::io::Error) -> State {
        warn!(target = %self.target, path = %self.data_path.display(), error = %e,
            "cannot spool this step; it will restart from the beginning if interrupted");
        let _ = std::fs::remove_file(&self.data_path);
        let _ = std::fs::remove_file(&self.meta_path);
        self.len = 0;
        State::Stopped
    }
}

/// Writes `path` whole, through a temporary file and a rename.
fn write_new(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

impl Replay {
    /// The next piece of the prefix, `None` at its end.
    pub fn next_piece(&mut self) -> std::io::Result<Option<Bytes>> {
        let mut buf = Vec::with_capacity(REPLAY_CHUNK);
        (&mut self.file)
            .take(REPLAY_CHUNK as u64)
            .read_to_end(&mut buf)?;
        Ok((!buf.is_empty()).then(|| Bytes::from(buf)))
    }
}

/// Bytes of spool read at a time during a replay.
const REPLAY_CHUNK: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use zq_proto::ForceAction;

    fn header(to: &str) -> StepHeader {
        StepHeader {
            source: "p/fs".into(),
            target: "b/fs".into(),
            from: Some(SnapRef {
                name: "a".into(),
                guid: 1,
            }),
            to: SnapRef {
                name: to.into(),
                guid: 0,
            },
            intermediates: false,
            force: ForceAction::None,
            compression: "none".into(),
        }
    }

    fn spools(dir: &Path, from: u64, max: u64) -> Spools {
        Spools::new(Some(SpoolConfig {
            dir: dir.to_path_buf(),
            from,
            max,
        }))
        .unwrap()
    }

    fn chunks() -> Vec<Bytes> {
        (0..8u8).map(|i| Bytes::from(vec![i; 1000])).collect()
    }

    /// A step of [`chunks`] into `target` that failed after its last chunk.
    fn interrupted(s: &Spools, target: &DatasetName) {
        let mut w = s.writer(&header("b"), target).unwrap();
        for c in &chunks() {
            w.write(c);
        }
        s.keep(w);
    }

    /// A spool in a fresh directory (removed when the guard drops) holding an interrupted
    /// 8000-byte step into b/fs, spooled from 1000 bytes up to `max`, and its token.
    async fn spooled(max: u64) -> (tempfile::TempDir, Spools, DatasetName, ResumeToken) {
        let dir = tempfile::tempdir().unwrap();
        let target = DatasetName::parse("b/fs").unwrap();
        let s = spools(dir.path(), 1000, max);
        interrupted(&s, &target);
        let t = s.token("b/fs").await.unwrap();
        (dir, s, target, t)
    }

    /// Where a sender resumes `t`.
    fn resume_at(t: &ResumeToken) -> ResumeAt {
        ResumeAt {
            offset: t.offset,
            prefix_hash: t.prefix_hash,
        }
    }

    #[tokio::test]
    async fn a_small_step_leaves_nothing_and_a_large_one_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let target = DatasetName::parse("b/fs").unwrap();
        let s = spools(dir.path(), 5000, 1 << 20);
        let mut w = s.writer(&header("b"), &target).unwrap();
        for c in &chunks()[..4] {
            w.write(c);
        }
        s.keep(w);
        assert_eq!(
            s.token("b/fs").await,
            None,
            "below the threshold: nothing on disk"
        );

        let mut w = s.writer(&header("b"), &target).unwrap();
        w.set_to_guid(42);
        let all: Vec<u8> = chunks().iter().flat_map(|c| c.to_vec()).collect();
        for c in &chunks() {
            w.write(c);
        }
        s.keep(w);
        let t = s.token("b/fs").await.unwrap();
        assert_eq!((t.offset, t.to.guid, t.from_guid), (8000, 42, Some(1)));
        assert_eq!(t.prefix_hash, *blake3::hash(&all).as_bytes());
        // The same token after a restart, from the file alone.
        let again = spools(dir.path(), 5000, 1 << 20);
        assert_eq!(again.token("b/fs").await, Some(t.clone()));
        let root = DatasetName::parse("b").unwrap();
        assert_eq!(again.tokens_under(&root, true).await, vec![t.clone()]);
        assert!(again.tokens_under(&root, false).await.is_empty());
    }

    #[tokio::test]
    async fn a_resume_replays_exactly_the_verified_prefix() {
        let (_dir, s, target, t) = spooled(1 << 20).await;
        // The sender resumes at an offset the spool holds (its token's).
        let at = resume_at(&t);
        let (mut replay, _w) = s.resume(&header("b"), at, &target).await.unwrap();
        let mut got = Vec::new();
        while let Some(d) = replay.next_piece().unwrap() {
            got.extend_from_slice(&d);
        }
        assert_eq!(got.len(), 8000);
        assert_eq!(*blake3::hash(&got).as_bytes(), t.prefix_hash);
    }

    #[tokio::test]
    async fn a_mismatched_resume_is_rejected_and_the_spool_discarded() {
        let (_dir, s, target, t) = spooled(1 << 20).await;
        let at = |offset, prefix_hash| ResumeAt {
            offset,
            prefix_hash,
        };
        for (h, at, why) in [
            (header("other"), at(t.offset, t.prefix_hash), "another step"),
            (header("b"), at(t.offset, [7; 32]), "do not match"),
            (
                header("b"),
                at(t.offset + 1, t.prefix_hash),
                "holds 8000 bytes",
            ),
        ] {
            interrupted(&s, &target);
            let e = s.resume(&h, at, &target).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::ResumeRejected);
            assert!(e.message.contains(why), "{}", e.message);
            assert_eq!(s.token("b/fs").await, None, "discarded");
        }
    }

    #[tokio::test]
    async fn a_resume_that_fails_before_its_replay_keeps_the_right_token() {
        let (_dir, s, target, t) = spooled(1 << 20).await;
        let at = resume_at(&t);
        // E.g. the target turned out busy or diverged: the step fails before any replay.
        let (_replay, w) = s.resume(&header("b"), at, &target).await.unwrap();
        s.keep(w);
        assert_eq!(s.token("b/fs").await, Some(t));
    }

    #[tokio::test]
    async fn spooling_stops_at_max_and_the_prefix_stays_resumable() {
        let (_dir, _s, _target, t) = spooled(2500).await;
        assert_eq!(t.offset, 2500);
        let all: Vec<u8> = chunks().iter().flat_map(|c| c.to_vec()).collect();
        assert_eq!(t.prefix_hash, *blake3::hash(&all[..2500]).as_bytes());
    }
}
