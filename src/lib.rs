//! Shared plumbing of the `zq-send` and `zq-recv` binaries: logging, exit codes and the
//! identity subcommands. The engines live in the `zq-*` crates; this stays thin.

#![forbid(unsafe_code)]
// Data from a peer or from zfs must not panic the process (tests may unwrap).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// `println!` that ignores a closed stdout (a reader that went away, `| head`): what the
/// programs print is for people and scripts, and a broken pipe is not a crash.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod config;
pub mod exit;
pub mod options;
pub mod run;
pub mod send;
pub mod serve;
pub mod status;

/// Transport flags shared by both binaries: what the QUIC windows and socket buffers are
/// sized for. Both ends should say the same (each side's receive window limits the other).
#[derive(clap::Args, Debug, Clone)]
#[group(id = "transport")]
#[command(next_help_heading = "Network")]
pub struct TransportArgs {
    /// Bandwidth-delay product of the path to size the QUIC windows for: link rate times
    /// round-trip time (1 Gbit/s x 50 ms = 6.25MB; the default covers 1 Gbit/s at
    /// 100 ms). Windows are limits, not allocations: see docs/operations.md.
    #[arg(long, value_name = "SIZE", default_value = "12.5MB", value_parser = parse_size)]
    pub bdp: u64,
    /// Congestion controller: cubic, or bbr for long lossy paths.
    #[arg(long, value_name = "NAME", default_value = "cubic")]
    pub congestion: zq_net::Congestion,
    /// UDP socket buffer to ask the kernel for, each direction (granted in full to root;
    /// otherwise capped by net.core.rmem_max/wmem_max, with a warning).
    #[arg(long, value_name = "SIZE", default_value = "32MiB", value_parser = parse_size)]
    pub udp_buffer: u64,
}

/// How a program that accepts connections (`zq-recv serve`, `zq-send serve` in pull mode)
/// treats new ones. In a config file: `[receivers.transport] address_validation`.
#[derive(clap::Args, Debug, Clone)]
#[group(skip)]
pub struct AdmissionArgs {
    /// When a connecting client must first prove its address with a QUIC Retry, one more
    /// round trip: auto (only while more than 64 handshakes are in progress, e.g. under a
    /// flood; reconnects stay 0-RTT) or always.
    #[arg(
        long,
        value_name = "WHEN",
        default_value = "auto",
        group = "transport",
        help_heading = "Network"
    )]
    pub address_validation: zq_net::AddressValidation,
}

impl TransportArgs {
    /// The transport settings these flags describe.
    pub fn tuning(&self) -> zq_net::Tuning {
        zq_net::Tuning {
            congestion: self.congestion,
            udp_buffer: usize::try_from(self.udp_buffer).unwrap_or(usize::MAX),
            ..zq_net::Tuning::for_bdp(self.bdp)
        }
    }
}

/// Which arguments of a subcommand the command line or the environment set: those
/// override a config file's values.
#[derive(Default)]
pub struct Given(std::collections::BTreeSet<String>);

impl Given {
    pub fn new(m: &clap::ArgMatches) -> Given {
        use clap::parser::ValueSource;
        Given(
            m.ids()
                .filter(|id| {
                    matches!(
                        m.value_source(id.as_str()),
                        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                    )
                })
                .map(|id| id.to_string())
                .collect(),
        )
    }

    pub fn has(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

/// A clap error's message without its usage lines: for arguments a config file gave,
/// where the usage of the command line would mislead.
pub fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let message: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    message.join(" ").trim_start_matches("error: ").to_owned()
}

/// A size on the command line: `4MiB`, `64G`, `12.5MB`, `1000`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s).map_err(|e| format!("{s:?}: {e} (e.g. 4MiB, 64G, 12.5MB)"))
}

/// How logs are written to stderr.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Text for people (colours only on a terminal).
    #[default]
    Human,
    /// One JSON object per line, for journald, Loki, Elasticsearch and the like.
    Json,
}

/// The logging options both programs take.
#[derive(clap::Args, Debug)]
pub struct LogArgs {
    /// Log format on stderr: human or json (one object per line). ZQ_LOG sets the level
    /// (error, warn, info, debug, or per module).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Same as --log-format json (the older spelling).
    #[arg(long, global = true, hide = true)]
    pub log_json: bool,
}

impl LogArgs {
    /// Whether to log JSON lines.
    pub fn json(&self) -> bool {
        self.log_json || self.log_format == LogFormat::Json
    }
}

/// Installs the log subscriber: stderr, filtered by `ZQ_LOG` (default `info`), human or
/// JSON lines.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("ZQ_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: journald, log files and pipes get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `--metrics-listen`'s TCP listener, if asked for; an error names the flag.
pub async fn bind_metrics(
    addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("--metrics-listen {addr}")))?;
    Ok(Some(listener))
}

/// Serves `render()` as Prometheus metrics on `listener` (`GET /metrics`), in the
/// background.
pub fn serve_metrics(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics on /metrics");
    }
    tokio::spawn(zq_repl::metrics::serve(
        listener,
        std::sync::Arc::new(render),
    ));
}

/// Installs logging and runs `main` on a tokio runtime with [`runtime_threads`] workers
/// (one: a single-threaded runtime).
pub fn block_on(log_json: bool, main: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    init_logging(log_json);
    let threads = runtime_threads(
        std::env::var("ZQ_THREADS").ok().as_deref(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let rt = match threads {
        Ok(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Ok(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        Err(e) => return fail(&exit::usage(anyhow::anyhow!(e))),
    };
    match rt {
        Ok(rt) => rt.block_on(main),
        Err(e) => fail(&anyhow::Error::new(e).context("starting the runtime")),
    }
}

/// How many threads run zq's own work (QUIC, TLS, hashing, compression): `ZQ_THREADS` if
/// set, else 1 on hosts with at most 2 cores and one per core above that. On 2 cores the
/// peer, `zfs send`/`receive` and the kernel need the other core, and one thread avoids
/// the cross-core wake-ups between quinn's drivers and the step tasks (measured: 1.6 CPU
/// s/GB per side instead of 2.0 on loopback, docs/benchmarks.md).
pub fn runtime_threads(env: Option<&str>, cores: usize) -> Result<usize, String> {
    match env {
        None | Some("") => Ok(if cores <= 2 { 1 } else { cores }),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => Err(format!(
                "ZQ_THREADS={v:?}: expected a number of threads from 1 to 1024"
            )),
        },
    }
}

/// Tells systemd (Type=notify units) the service is ready, and returns a flag that turns
/// true on SIGTERM or SIGINT, when systemd is told it is stopping. A no-op for systemd
/// elsewhere. The three programs' services all start and stop this way.
pub fn ready_until_signal() -> tokio::sync::watch::Receiver<bool> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received, stopping");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        let _ = stop.send(true);
    });
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    stopped
}

/// Resolves once `stop` (from [`ready_until_signal`]) turns true.
pub async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The identity subcommands both binaries share.
#[derive(clap::Subcommand, Debug)]
pub enum IdentityCommand {
    /// Create this program's identity in DIR and print its fingerprint
    ///
    /// Creates the certificate and its 0600 key in DIR and prints the fingerprint to pin
    /// on the other side. Refuses to overwrite an existing identity.
    Keygen {
        /// Directory for the identity files (created with mode 0700).
        dir: PathBuf,
    },
    /// Print the fingerprint of this program's identity in DIR
    Fingerprint {
        /// Directory holding the identity.
        dir: PathBuf,
    },
}

impl IdentityCommand {
    /// Runs the command for `role` (`zq-send` or `zq-recv`): prints one fingerprint line.
    pub fn run(&self, role: &str) -> ExitCode {
        let result = match self {
            IdentityCommand::Keygen { dir } => {
                zq_net::Identity::generate(dir, role).map_err(|e| (e, "keygen"))
            }
            IdentityCommand::Fingerprint { dir } => {
                zq_net::Identity::fingerprint_of(dir, role).map_err(|e| (e, "fingerprint"))
            }
        };
        match result {
            Ok(fp) => {
                out!("{fp}");
                ExitCode::SUCCESS
            }
            Err((e, what)) => fail(&anyhow::Error::new(e).context(what)),
        }
    }
}

/// `err` and its causes, joined by `: ` (what `{:#}` does for anyhow errors).
pub use zq_repl::error::chain;

/// Prints `err` with its causes on stderr.
pub fn report(err: &anyhow::Error) {
    eprintln!("error: {err:#}");
}

/// Prints `err` with its causes and returns its exit code ([`exit::code`]).
pub fn fail(err: &anyhow::Error) -> ExitCode {
    exit::fail(err)
}

#[cfg(test)]
mod tests {
    use super::runtime_threads;

    #[test]
    fn one_thread_on_small_hosts_unless_told() {
        assert_eq!(runtime_threads(None, 1), Ok(1));
        assert_eq!(runtime_threads(None, 2), Ok(1));
        assert_eq!(runtime_threads(None, 16), Ok(16));
        assert_eq!(runtime_threads(Some(""), 8), Ok(8));
        assert_eq!(runtime_threads(Some("4"), 2), Ok(4));
        for bad in ["0", "-1", "many", "5000"] {
            assert!(runtime_threads(Some(bad), 2)
                .unwrap_err()
                .contains("ZQ_THREADS"));
        }
    }
}
