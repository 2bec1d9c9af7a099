//! The only place that spawns processes: explicit argv (never a shell), stderr drained on
//! its own task and attached to the error, spawn failure kept apart from a non-zero exit,
//! children killed on drop.

use crate::timing::Timer;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

/// Most stderr kept per command (the rest is dropped, the process is never blocked on it).
const MAX_STDERR: usize = 64 * 1024;

/// A command could not be run or failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started at all (not installed, not executable).
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{argv}` failed ({status}): {}", stderr.trim())]
    Failed {
        /// The command line, for the message (arguments are separated by spaces).
        argv: String,
        /// Exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Reading from or writing to the process failed.
    #[error("`{argv}`: I/O error")]
    Io {
        /// The command line.
        argv: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl CommandError {
    /// The stderr of a failed command, if it ran.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            CommandError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// A program and its arguments.
#[derive(Debug, Clone)]
pub struct Argv {
    program: PathBuf,
    args: Vec<OsString>,
}

impl Argv {
    /// `program` with no arguments yet.
    pub fn new(program: impl AsRef<Path>) -> Self {
        Argv {
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Appends several arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(self, args: I) -> Self {
        args.into_iter().fold(self, Argv::arg)
    }

    /// Appends one argument if `cond`.
    pub fn arg_if(self, cond: bool, a: impl Into<OsString>) -> Self {
        if cond {
            self.arg(a)
        } else {
            self
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args).kill_on_drop(true);
        c
    }

    /// The zfs subcommand (`list`, `send`, …) for timings.
    fn subcommand(&self) -> &str {
        self.args
            .first()
            .and_then(|a| a.to_str())
            .filter(|a| a.bytes().all(|b| b.is_ascii_lowercase()))
            .unwrap_or("other")
    }

    fn timer(&self) -> Timer {
        Timer::start(self.subcommand(), || self.to_string())
    }

    fn spawn_err(&self, source: std::io::Error) -> CommandError {
        CommandError::Spawn {
            program: self.program.display().to_string(),
            source,
        }
    }
}

impl std::fmt::Display for Argv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.program.display())?;
        for a in &self.args {
            write!(f, " {}", a.to_string_lossy())?;
        }
        Ok(())
    }
}

/// Runs `argv` to completion and returns its stdout.
pub async fn run(argv: &Argv) -> Result<String, CommandError> {
    run_with_input(argv, None).await
}

/// Runs `argv` to completion with `input` (if any) on its stdin, and returns its stdout.
/// The input is written whole before the output is read: keep it small (a channel
/// program), or the child may block writing output nobody reads yet.
pub async fn run_with_input(argv: &Argv, input: Option<&[u8]>) -> Result<String, CommandError> {
    let timer = argv.timer();
    let mut cmd = argv.command();
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| argv.spawn_err(e))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // A child that exits without reading all of it (an error) says why on stderr.
        let _ = stdin.write_all(input).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| argv.spawn_err(e))?;
    timer.stop_read(Some(
        out.stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
    ));
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr.truncate(MAX_STDERR.min(stderr.len()));
        return Err(CommandError::Failed {
            argv: argv.to_string(),
            status: out.status,
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn drain_stderr(child: &mut Child) -> JoinHandle<String> {
    let stderr = child.stderr.take();
    tokio::spawn(async move {
        let Some(mut stderr) = stderr else {
            return String::new();
        };
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        // Keep the first MAX_STDERR bytes; keep reading so the child never blocks.
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let room = MAX_STDERR.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        String::from_utf8_lossy(&kept).into_owned()
    })
}

async fn finish(
    argv: &str,
    mut child: Child,
    stderr: JoinHandle<String>,
    timer: &Timer,
) -> Result<String, CommandError> {
    let status = child.wait().await.map_err(|source| CommandError::Io {
        argv: argv.to_string(),
        source,
    })?;
    timer.stop();
    let stderr = stderr.await.unwrap_or_default();
    if status.success() {
        Ok(stderr)
    } else {
        Err(CommandError::Failed {
            argv: argv.to_string(),
            status,
            stderr,
        })
    }
}

/// A running process whose stdout is read (e.g. `zfs send`).
#[derive(Debug)]
pub struct Reader {
    argv: String,
    timer: Timer,
    child: Child,
    stdout: ChildStdout,
    stderr: JoinHandle<String>,
}

impl Reader {
    /// Starts `argv` with stdout piped.
    pub fn spawn(argv: &Argv) -> Result<Self, CommandError> {
        let mut child = argv
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| argv.spawn_err(e))?;
        let stderr = drain_stderr(&mut child);
        let stdout = child.stdout.take().ok_or_else(|| CommandError::Io {
            argv: argv.to_string(),
            source: std::io::Error::other("stdout was not captured"),
        })?;
        Ok(Reader {
            argv: argv.to_string(),
            timer: argv.timer(),
            child,
            stdout,
            stderr,
        })
    }

    /// Reads until `buf` holds `want` bytes or stdout ends. Returns false at end of stream
    /// with nothing read.
    pub async fn fill(&mut self, buf: &mut BytesMut, want: usize) -> Result<bool, CommandError> {
        buf.reserve(want.saturating_sub(buf.len()));
        while buf.len() < want {
            let n = (&mut self.stdout)
                .take((want - buf.len()) as u64)
                .read_buf(buf)
                .await
                .map_err(|source| CommandError::Io {
                    argv: self.argv.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
        }
        Ok(!buf.is_empty())
    }

    /// Waits for the process; an error carries its stderr.
    pub async fn wait(self) -> Result<(), CommandError> {
        drop(self.stdout);
        finish(&self.argv, self.child, self.stderr, &self.timer)
            .await
            .map(|_| ())
    }

    /// The command line.
    pub fn argv(&self) -> &str {
        &self.argv
    }
}

/// A running process whose stdin is written (e.g. `zfs receive`).
#[derive(Debug)]
pub struct Writer {
    argv: String,
    timer: Timer,
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: JoinHandle<String>,
}

impl Writer {
    /// Starts `argv` with stdin piped and stdout discarded.
    pub fn spawn(argv: &Argv) -> Result<Self, CommandError> {
        let mut child = argv
            .command()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| argv.spawn_err(e))?;
        let stderr = drain_stderr(&mut child);
        let stdin = child.stdin.take();
        Ok(Writer {
            argv: argv.to_string(),
            timer: argv.timer(),
            child,
            stdin,
            stderr,
        })
    }

    /// Writes `data` to stdin. If the process already exited (broken pipe), the error is
    /// its exit status and stderr, which says why, rather than the pipe error.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), CommandError> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(CommandError::Io {
                argv: self.argv.clone(),
                source: std::io::Error::other("stdin already closed"),
            });
        };
        if let Err(source) = stdin.write_all(data).await {
            self.stdin = None;
            if let Ok(status) = self.child.wait().await {
                if !status.success() {
                    let stderr = (&mut self.stderr).await.unwrap_or_default();
                    return Err(CommandError::Failed {
                        argv: self.argv.clone(),
                        status,
                        stderr,
                    });
                }
            }
            return Err(CommandError::Io {
                argv: self.argv.clone(),
                source,
            });
        }
        Ok(())
    }

    /// Closes stdin and waits; `Ok` carries stderr (zfs prints notes there).
    pub async fn finish(mut self) -> Result<String, CommandError> {
        if let Some(mut stdin) = self.stdin.take() {
            // A failed flush shows up as the exit status below.
            let _ = stdin.shutdown().await;
        }
        finish(&self.argv, self.child, self.stderr, &self.timer).await
    }

    /// Kills the process before it saw the end of its input and reaps it. Used when the
    /// stream failed verification: `zfs receive` then discards the partial stream.
    pub async fn abort(mut self) {
        self.stdin = None;
        let _ = self.child.kill().await;
        self.stderr.abort();
    }

    /// The command line.
    pub fn argv(&self) -> &str {
        &self.argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawn_failure_is_not_exit_failure() {
        let e = run(&Argv::new("/nonexistent/zfs")).await.unwrap_err();
        assert!(matches!(e, CommandError::Spawn { .. }), "{e}");
    }

    #[tokio::test]
    async fn failure_carries_stderr_and_no_shell_is_involved() {
        let e = run(&Argv::new("sh").arg("-c").arg("echo boom >&2; exit 3"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        // An argument with shell syntax is passed through literally.
        let out = run(&Argv::new("echo").arg("$(id); rm -rf /"))
            .await
            .unwrap();
        assert_eq!(out, "$(id); rm -rf /\n");
    }

    #[tokio::test]
    async fn reader_and_writer_pipe_bytes() {
        let mut r = Reader::spawn(&Argv::new("printf").arg("abcdef")).unwrap();
        let mut buf = BytesMut::new();
        assert!(r.fill(&mut buf, 4).await.unwrap());
        assert_eq!(&buf[..], b"abcd");
        buf.clear();
        assert!(r.fill(&mut buf, 4).await.unwrap());
        assert_eq!(&buf[..], b"ef");
        buf.clear();
        assert!(!r.fill(&mut buf, 4).await.unwrap());
        r.wait().await.unwrap();

        let mut w = Writer::spawn(&Argv::new("sh").arg("-c").arg("cat >/dev/null")).unwrap();
        w.write(b"hello").await.unwrap();
        w.finish().await.unwrap();
    }

    #[tokio::test]
    async fn writer_to_dead_process_reports_its_stderr() {
        let mut w = Writer::spawn(&Argv::new("sh").arg("-c").arg("echo nope >&2; exit 1")).unwrap();
        let big = vec![0u8; 1 << 20];
        let mut last = Ok(());
        for _ in 0..8 {
            last = w.write(&big).await;
            if last.is_err() {
                break;
            }
        }
        let e = match last {
            Err(e) => e,
            Ok(()) => w.finish().await.unwrap_err(),
        };
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
